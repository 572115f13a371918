"""Choosing the kernel build for the CPU (flags parser, QUILL_ISA), building every variant warning-free, and the
multi-row path tuner (its choice keeps results within the speed paths' tolerances; it is kept after a second
timing; a bad cache is rebuilt).

The /proc/cpuinfo lines below are those of an AMD EPYC 7763 (Zen 3: AVX2 only), an AMD EPYC 9654 (Zen 4:
AVX-512 with VNNI and BF16) and an Intel Xeon of family 6 model 106 (Ice Lake-SP, under KVM: AVX-512 with VNNI,
no BF16), as Linux lists them.
"""

from __future__ import annotations

import functools
import gc
import json
import os
import time
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from quill import kernels
from quill.errors import InvalidParameter
from quill.kernels import build, tune
from quill.kernels.cpu import AVX2, AVX512, AVX512_BF16, VARIANTS, CPU, choose_variant, parse_cpuinfo, this_cpu
from quill import model as model_module
from quill.model import GPT, GPTConfig
from quill.quantize import Int8Linear

ZEN3 = """processor	: 0
vendor_id	: AuthenticAMD
cpu family	: 25
model		: 1
model name	: AMD EPYC 7763 64-Core Processor
flags		: fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse sse2 ht syscall nx mmxext fxsr_opt pdpe1gb rdtscp lm constant_tsc rep_good nopl nonstop_tsc cpuid extd_apicid aperfmperf rapl pni pclmulqdq monitor ssse3 fma cx16 pcid sse4_1 sse4_2 x2apic movbe popcnt aes xsave avx f16c rdrand lahf_lm cmp_legacy svm extapic cr8_legacy abm sse4a misalignsse 3dnowprefetch osvw ibs skinit wdt tce topoext perfctr_core perfctr_nb bpext perfctr_llc mwaitx cpb cat_l3 cdp_l3 invpcid_single hw_pstate ssbd mba ibrs ibpb stibp vmmcall fsgsbase bmi1 avx2 smep bmi2 erms invpcid cqm rdt_a rdseed adx smap clflushopt clwb sha_ni xsaveopt xsavec xgetbv1 xsaves cqm_llc cqm_occup_llc cqm_mbm_total cqm_mbm_local clzero irperf xsaveerptr rdpru wbnoinvd amd_ppin brs arat npt lbrv svm_lock nrip_save tsc_scale vmcb_clean flushbyasid decodeassists pausefilter pfthreshold v_vmsave_vmload vgif v_spec_ctrl umip pku ospke vaes vpclmulqdq rdpid overflow_recov succor smca fsrm
bugs		: sysret_ss_attrs spectre_v1 spectre_v2 spec_store_bypass srso

processor	: 1
model name	: AMD EPYC 7763 64-Core Processor
flags		: fpu
"""

ZEN4 = """processor	: 0
vendor_id	: AuthenticAMD
cpu family	: 25
model		: 17
model name	: AMD EPYC 9654 96-Core Processor
flags		: fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse sse2 ht syscall nx mmxext fxsr_opt pdpe1gb rdtscp lm constant_tsc rep_good nopl nonstop_tsc cpuid extd_apicid aperfmperf rapl pni pclmulqdq monitor ssse3 fma cx16 pcid sse4_1 sse4_2 x2apic movbe popcnt aes xsave avx f16c rdrand lahf_lm cmp_legacy svm extapic cr8_legacy abm sse4a misalignsse 3dnowprefetch osvw ibs skinit wdt tce topoext perfctr_core perfctr_nb bpext perfctr_llc mwaitx cpb cat_l3 cdp_l3 invpcid_single hw_pstate ssbd mba perfmon_v2 ibrs ibpb stibp ibrs_enhanced vmmcall fsgsbase bmi1 avx2 smep bmi2 erms invpcid cqm rdt_a avx512f avx512dq rdseed adx smap avx512ifma clflushopt clwb avx512cd sha_ni avx512bw avx512vl xsaveopt xsavec xgetbv1 xsaves cqm_llc cqm_occup_llc cqm_mbm_total cqm_mbm_local avx512_bf16 clzero irperf xsaveerptr rdpru wbnoinvd amd_ppin cppc arat npt lbrv svm_lock nrip_save tsc_scale vmcb_clean flushbyasid decodeassists pausefilter pfthreshold avic v_vmsave_vmload vgif x2avic v_spec_ctrl vnmi avx512vbmi umip pku ospke avx512_vbmi2 gfni vaes vpclmulqdq avx512_vnni avx512_bitalg avx512_vpopcntdq la57 rdpid overflow_recov succor smca fsrm flush_l1d
bugs		: sysret_ss_attrs spectre_v1 spectre_v2 spec_store_bypass srso
"""

ICELAKE = """processor	: 0
vendor_id	: GenuineIntel
cpu family	: 6
model		: 106
model name	: Intel(R) Xeon(R) Processor @ 2.80GHz
flags		: fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse sse2 ss ht syscall nx pdpe1gb rdtscp lm constant_tsc rep_good nopl xtopology nonstop_tsc cpuid tsc_known_freq pni pclmulqdq ssse3 fma cx16 pcid sse4_1 sse4_2 x2apic movbe popcnt tsc_deadline_timer aes xsave avx f16c rdrand hypervisor lahf_lm abm 3dnowprefetch cpuid_fault fsgsbase tsc_adjust bmi1 hle avx2 smep bmi2 erms invpcid rtm avx512f avx512dq rdseed adx smap avx512ifma clflushopt clwb avx512cd sha_ni avx512bw avx512vl xsaveopt xsavec xgetbv1 xsaves arat avx512vbmi umip avx512_vbmi2 gfni vaes vpclmulqdq avx512_vnni avx512_bitalg avx512_vpopcntdq rdpid fsrm arch_capabilities
bugs		: spectre_v1 spectre_v2 spec_store_bypass swapgs mmio_stale_data retbleed bhi spectre_v2_user its its_native_only
"""


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).abs().max() / a.abs().max())


def test_flags_parser_picks_avx2_on_zen3_avx512_on_ice_lake_and_avx512bf16_on_zen4():
    zen3, zen4, ice = parse_cpuinfo(ZEN3), parse_cpuinfo(ZEN4), parse_cpuinfo(ICELAKE)
    assert zen3.model == "AMD EPYC 7763 64-Core Processor" and zen4.model == "AMD EPYC 9654 96-Core Processor"
    assert "avx2" in zen3.flags and "fpu" in zen3.flags and "avx512f" not in zen3.flags  # the first processor's
    assert choose_variant(zen3, "auto") is AVX2 and choose_variant(zen3, "avx2") is AVX2
    assert zen3.missing(AVX512) == ["avx512f", "avx512bw", "avx512vl", "avx512_vnni"]
    with pytest.raises(InvalidParameter, match="avx512f, avx512bw, avx512vl, avx512_vnni$"):
        choose_variant(zen3, "avx512")
    assert choose_variant(zen4, "auto") is AVX512_BF16 and choose_variant(zen4, " AVX2 ") is AVX2
    assert choose_variant(zen4, "avx512") is AVX512 and zen4.missing(AVX512_BF16) == []
    # VNNI without BF16 (Ice Lake, Cascade Lake): the AVX-512 variant, and avx512bf16 names the missing flag
    assert ice.model.startswith("Intel(R) Xeon(R)") and choose_variant(ice, "auto") is AVX512
    with pytest.raises(InvalidParameter, match="lacks avx512_bf16$"):
        choose_variant(ice, "avx512bf16")
    # AVX-512 without VNNI (Skylake-SP): AVX2
    assert choose_variant(CPU(ice.model, ice.flags - {"avx512_vnni"}), "auto") is AVX2
    old = CPU("an old x86", frozenset({"sse2", "avx"}))
    assert choose_variant(old, "auto") is None  # the torch path serves
    with pytest.raises(InvalidParameter, match="not a kernel variant"):
        choose_variant(zen4, "sse9")


def test_without_proc_cpuinfo_torch_capability_decides(monkeypatch, tmp_path):
    """Another OS (no /proc/cpuinfo): the flags torch's capability check implies, so AVX2 at most (torch's
    AVX512 level says nothing of VNNI or BF16)."""
    import quill.kernels.cpu as cpu_module

    monkeypatch.setattr(cpu_module, "CPUINFO", tmp_path / "missing")
    monkeypatch.setattr(cpu_module.platform, "machine", lambda: "x86_64")
    capability = torch.backends.cpu.get_cpu_capability()
    chosen = choose_variant(cpu_module.this_cpu(), "auto")
    assert chosen is (AVX2 if capability in ("AVX2", "AVX512") else None)


def test_every_variant_builds_warning_free():
    """Every variant compiles with this machine's compiler, -Wall -Wextra clean, whatever the CPU runs."""
    for variant in VARIANTS.values():
        b = build.build(variant)
        assert b.path.exists() and b.warnings.strip() == "", (variant.name, b.warnings)


@pytest.mark.skipif(not kernels.available(), reason="quill kernels unavailable")
def test_quill_isa_overrides_and_refuses_what_the_cpu_lacks(monkeypatch):
    try:
        for name, variant in VARIANTS.items():
            monkeypatch.setenv("QUILL_ISA", name)
            kernels.reload()
            missing = this_cpu().missing(variant)
            if missing:
                with pytest.raises(InvalidParameter, match=missing[0]):
                    kernels.available()
                assert kernels.system_report()["error"].endswith(", ".join(missing))
            else:
                assert kernels.variant() is variant and kernels.system_report()["compiled_for"] == name
        monkeypatch.setenv("QUILL_ISA", "avx1024")
        kernels.reload()
        with pytest.raises(InvalidParameter, match="not a kernel variant"):
            kernels.available()
        monkeypatch.setenv("QUILL_ISA", "auto")
        kernels.reload()
        report = kernels.system_report()
        assert report["variant"] == choose_variant(this_cpu(), "auto").name and "avx2" in report["flags"]
    finally:
        monkeypatch.undo()
        kernels.reload()


def test_the_first_call_after_reload_runs_the_new_variant(monkeypatch):
    """The entry points use the loaded library without asking the dispatcher again: after `reload` (how the
    tests' kernel_isa fixture switches variants) the first call must already run the newly chosen build."""
    runnable = [name for name, v in VARIANTS.items() if not this_cpu().missing(v)]
    if not runnable or not kernels.available():
        pytest.skip("no kernel variant runs on this CPU")
    x, w = torch.randn(2, 64), torch.randn(8, 64)
    try:
        for name in runnable * 2:
            monkeypatch.setenv("QUILL_ISA", name)
            kernels.reload()
            kernels.linear(x, w)
            assert kernels._lib.quill_isa().decode() == name
    finally:
        monkeypatch.undo()
        kernels.reload()


def make_model(cfg: GPTConfig, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if "ln" in name and name.endswith("weight") else 0.0, 0.2)
    return model


CFG = GPTConfig(vocab_size=97, n_positions=64, n_embd=48, n_head=3, n_layer=2)


def _prefill_and_decode(model: GPT, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.inference_mode():
        cache = model.new_cache(x.shape[0])
        prefill = model(x[:, :-1], 0, cache)
        return prefill, model(x[:, -1:], x.shape[1] - 1, cache)


class TorchPath(TorchDispatchMode):
    """Every op as torch runs it: under a dispatch mode the kernels stand aside (kernels.observed)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


@pytest.fixture
def tuning(tmp_path, monkeypatch):
    """The tuner switched on, with a cache folder of its own; yields the tuning cache file's path."""
    monkeypatch.setenv("QUILL_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("QUILL_TUNE", "1")
    tune.forget()
    yield tune.cache_file(kernels.variant().name)
    tune.forget()


@pytest.mark.skipif(not kernels.available(), reason="quill kernels unavailable")
@pytest.mark.usefixtures("kernel_isa")
def test_tuned_paths_agree_with_the_torch_path(tuning):
    """Every multi-row path timed and chosen, against the plain torch path (no kernels), with the speed-path
    tests' tolerances: a prefill of 6 x 39 rows and a 6-row decode step, fp32 within 1e-5 and bf16 within 5e-2
    of fp32; an int8 layer within 3e-2 of its dequantised product at 20 and 120 rows."""
    x = torch.randint(0, CFG.vocab_size, (6, 40))
    fp32 = make_model(CFG)
    torch.manual_seed(0)
    layer = Int8Linear.from_linear(torch.nn.Linear(96, 80))
    rows = [torch.randn(20, 96), torch.randn(3, 40, 96)]
    with TorchPath():
        ref = _prefill_and_decode(fp32, x)
    got = _prefill_and_decode(fp32, x)
    assert rel_err(ref[0], got[0]) <= 1e-5 and rel_err(ref[1], got[1]) <= 1e-5
    half = _prefill_and_decode(make_model(CFG).to(torch.bfloat16), x)
    assert rel_err(ref[0], half[0]) <= 5e-2 and rel_err(ref[1], half[1]) <= 5e-2
    with torch.inference_mode():
        for r in rows:
            exact = torch.nn.functional.linear(r, layer.dequantized(torch.float32), layer.bias)
            assert rel_err(exact, layer(r)) <= 3e-2
    choices = json.loads(tuning.read_text())["choices"]
    decode = [k for k in choices if k.startswith("decode")]
    assert len(decode) == 2 and {choices[k] for k in decode} <= {"6", "3"}
    prefill = [k for k in choices if k.startswith("linear") and "rows<=256" in k]
    assert {k.split()[1] for k in prefill} == {"w=float32", "w=bfloat16"}
    int8 = [k for k in choices if k.startswith("linear w=int8")]
    assert sorted(k.split()[4] for k in int8) == ["rows<=128", "rows<=32"]
    # on u8 rows (AVX-512 VNNI) the u8 GEMM is the kernel's one rival (the same bits); elsewhere the int16 paths
    rivals = {"[quill,u8gemm]"} if kernels.u8_rows(96) else {"[quill,i8gemm,torch]"}
    assert {k.split()[-1] for k in int8} == rivals
    assert all(choices[k] in ("quill", "torch", "onednn", "f32gemm", "bf16gemm", "fbgemm", "i8gemm", "u8gemm")
               for k in prefill + int8)


@pytest.mark.skipif(not model_module._ONEDNN_LINEAR, reason="torch built without oneDNN's linear op")
@pytest.mark.parametrize("bias", [True, False])
def test_the_onednn_candidate_equals_f_linear(bias):
    """The fp32 candidate beside MKL's GEMM: the same product for 2-d and 3-d inputs, with or without bias, and
    with each activation or a residual added as its post-op."""
    torch.manual_seed(0)
    layer = model_module.Linear(96, 80, bias=bias)
    with torch.inference_mode():
        for x in (torch.randn(20, 96), torch.randn(3, 40, 96)):
            y = torch.nn.functional.linear(x, layer.weight, layer.bias)
            assert rel_err(y, layer._onednn_forward(x)) <= 1e-6
            for act, f in model_module.ACTIVATIONS.items():
                assert rel_err(f(y), layer._onednn_forward(x, act)) <= 1e-6, act
            residual = torch.randn(y.shape)
            assert rel_err(residual + y, layer._onednn_forward(x, None, residual)) <= 1e-6


@pytest.mark.skipif(not kernels.available(), reason="quill kernels unavailable")
@pytest.mark.usefixtures("kernel_isa")
@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16])
def test_the_f32_gemm_candidate_equals_f_linear(wdtype):
    """Quill's fp32 GEMM as the projections call it: the product of F.linear on the fp32 weight for 2-d and 3-d
    inputs, with or without bias, and with each activation or a residual added as it writes the output."""
    torch.manual_seed(0)
    for bias in (True, False):
        layer = model_module.Linear(96, 80, bias=bias).to(wdtype)
        w, b = layer.weight.float(), None if layer.bias is None else layer.bias.float()
        with torch.inference_mode():
            for x in (torch.randn(20, 96), torch.randn(3, 40, 96)):
                y = torch.nn.functional.linear(x, w, b)
                assert rel_err(y, layer._f32_gemm(x)) <= 1e-6
                for act, f in model_module.ACTIVATIONS.items():
                    assert rel_err(f(y), layer._f32_gemm(x, act)) <= 1e-6, act
                residual = torch.randn(y.shape)
                assert rel_err(residual + y, layer._f32_gemm(x, None, residual)) <= 1e-6


@pytest.mark.skipif(not kernels.available(), reason="quill kernels unavailable")
def test_batched_decode_may_split_into_halves(tuning):
    """The guard that makes 16 rows never slower than 8: a 16-row step is timed whole and as two 8-row calls
    (and either way gives the rows' own results)."""
    model = make_model(CFG)
    x = torch.randint(0, CFG.vocab_size, (16, 5))
    _, together = _prefill_and_decode(model, x)
    choices = json.loads(tuning.read_text())["choices"]
    (key,) = [k for k in choices if k.startswith("decode")]
    assert key.endswith("rows=16 [16,8]") and choices[key] in ("16", "8")
    alone = torch.cat([_prefill_and_decode(model, x[i:i + 1])[1] for i in range(16)])
    assert rel_err(alone, together) <= 1e-5


@pytest.mark.skipif(not kernels.available(), reason="quill kernels unavailable")
@pytest.mark.parametrize("damage", ["corrupt", "foreign", "wrong-shape", "stale", "bad-trial"])
def test_a_bad_tuning_cache_is_ignored_and_rebuilt(tuning, damage):
    torch.manual_seed(0)
    layer = Int8Linear.from_linear(torch.nn.Linear(64, 40))
    x = torch.randn(20, 64)
    tuning.parent.mkdir(parents=True, exist_ok=True)
    rivals = "[quill,u8gemm]" if kernels.u8_rows(64) else "[quill,i8gemm,torch]"
    key = f"linear w=int8 x=float32 40x64 rows<=32 {rivals}"  # the key 20 rows look up
    bogus = {"format": tune.FORMAT, "machine": tune.machine(kernels.variant().name), "choices": {key: "no-such-path"},
             "trials": {}}
    if damage == "corrupt":
        tuning.write_bytes(b"\x00{not json")
    elif damage == "foreign":
        tuning.write_text(json.dumps({**bogus, "machine": {**bogus["machine"], "cpu": "another CPU"},
                                      "choices": {key: "torch"}}))
    elif damage == "wrong-shape":
        tuning.write_text(json.dumps({**bogus, "choices": ["quill"]}))
    elif damage == "stale":  # this machine's file naming a path that no longer exists: timed again
        tuning.write_text(json.dumps(bogus))
    else:  # a choice whose first timing does not parse: timed afresh, not confirmed with it
        tuning.write_text(json.dumps({**bogus, "choices": {key: "quill"}, "trials": {key: {"times": "fast"}}}))
    with torch.inference_mode():
        got = layer(x)
    exact = torch.nn.functional.linear(x, layer.dequantized(torch.float32), layer.bias)
    assert rel_err(exact, got) <= 3e-2
    data = json.loads(tuning.read_text())
    assert data["machine"] == tune.machine(kernels.variant().name)
    assert list(data["choices"].values()) and set(data["choices"].values()) <= {"quill", "i8gemm", "u8gemm", "fbgemm", "torch"}
    assert data["trials"][key]["pid"] == os.getpid()  # a first timing, made now


@pytest.mark.skipif(not kernels.available(), reason="quill kernels unavailable")
def test_only_the_chosen_path_keeps_its_packed_weight(tuning, monkeypatch):
    """Candidates pack the weight into their GEMM's layout when timed; the losers' copies are dropped, so a
    layer holds at most the copy of the path that serves it (each path made to win in turn, the clock stood in
    for; the copies are really made and released)."""
    monkeypatch.setenv("QUILL_INT8_GEMM", "1")  # fbgemm's GEMM among them where torch has it
    torch.manual_seed(0)
    x = torch.randn(120, 64)
    timed = tune._time
    for winner in ("_panel_gemm", "_u8_gemm", "_gemm", "_dequantized_forward"):
        layer = Int8Linear.from_linear(torch.nn.Linear(64, 40))
        copies = {"_panel_gemm": layer._panels, "_u8_gemm": layer._u8_panels, "_gemm": layer._packed}
        named = []

        def fake_time(candidates, key, before=None):
            def name(fn):
                return getattr(getattr(fn, "func", fn), "__name__", "")

            named.extend(name(fn) for fn in candidates.values())
            return {n: (0.0 if name(candidates[n]) == winner else 1.0, made)
                    for n, (_, made) in timed(candidates, key, before).items()}

        monkeypatch.setattr(tune, "_time", fake_time)
        tune.forget()
        tuning.unlink(missing_ok=True)
        with torch.inference_mode():
            layer(x)
        if winner not in named:
            continue  # a candidate not offered here (fbgemm's; the u8 GEMM's, or the int16 ones on u8 rows)
        assert {n for n, c in copies.items() if c.made} == {winner} & copies.keys(), winner
        assert sum(c.made for c in copies.values()) <= 1 and len(named) >= 2


@pytest.mark.parametrize("first", ["this process", "a previous process"])
def test_a_choice_is_kept_after_a_second_timing(tuning, monkeypatch, first):
    """A first timing's choice serves at once and is not timed again early; at its first use CONFIRM_AFTER
    seconds on (or at once in a later process) the candidates are timed again and each counts its best of both,
    so a slow spell in one timing does not decide; what the first choice made is released if it lost. A
    confirmed choice is read back from the file and never timed again (the clock stood in for)."""
    isa, candidates = kernels.variant().name, {"a": lambda: None, "b": lambda: None}
    scripted, timings, released = iter([{"a": 2.0, "b": 1.5}, {"a": 1.0, "b": 1.6}]), [], []

    def fake_time(cands, key, before=None):
        timings.append(key)
        return {n: (t, [functools.partial(released.append, (len(timings), n))]) for n, t in next(scripted).items()}

    monkeypatch.setattr(tune, "_time", fake_time)
    if first == "this process":
        assert tune.choose(isa, "k", candidates, "a") == "b" and released == [(1, "a")]
        assert tune.choose(isa, "k", candidates, "a") == "b" and len(timings) == 1  # not due yet
        monkeypatch.setattr(tune, "CONFIRM_AFTER", 0.0)
    else:
        next(scripted)
        tuning.parent.mkdir(parents=True, exist_ok=True)
        tuning.write_text(json.dumps({"format": tune.FORMAT, "machine": tune.machine(isa), "choices": {"k": "b"},
                                      "trials": {"k": {"times": {"a": 2.0, "b": 1.5}, "pid": os.getpid() + 1,
                                                       "at": time.time()}}}))
    saved = json.loads(tuning.read_text())
    assert saved["choices"] == {"k": "b"} and saved["trials"]["k"]["times"] == {"a": 2.0, "b": 1.5}
    assert tune.choose(isa, "k", candidates, "a") == "a"  # best of both: a 1.0 s, b 1.5 s
    second = len(timings)
    # the second timing's loser, and in this process also the first timing's loser and its dropped choice
    assert sorted(released) == ([(1, "a"), (1, "b"), (2, "b")] if first == "this process" else [(1, "b")])
    saved = json.loads(tuning.read_text())
    assert saved["choices"] == {"k": "a"} and saved["trials"] == {}
    tune.forget()
    assert tune.choose(isa, "k", candidates, "b") == "a" and len(timings) == second


@pytest.mark.skipif(not kernels.available(), reason="quill kernels unavailable")
def test_a_layer_dropped_before_its_choice_is_confirmed_is_freed(tuning, monkeypatch):
    """The tuner keeps, until the second timing, how to release what the chosen path made; it must not keep
    the layer's packed copies alive after the layer is gone (Quill's int8 or u8 GEMM made to win: it packs)."""
    timed = tune._time

    def packing_wins(candidates, key, before=None):
        return {n: (0.0 if n in ("i8gemm", "u8gemm") else 1.0, made)
                for n, (_, made) in timed(candidates, key, before).items()}

    monkeypatch.setattr(tune, "_time", packing_wins)
    torch.manual_seed(0)
    layer = Int8Linear.from_linear(torch.nn.Linear(64, 40))
    with torch.inference_mode():
        layer(torch.randn(120, 64))
    assert layer._panels.made or layer._u8_panels.made
    copies = [weakref.ref(c) for c in (layer._panels, layer._u8_panels, layer._packed, layer._sums)]
    del layer
    gc.collect()
    assert all(ref() is None for ref in copies)


def test_candidates_take_turns_and_one_without_a_backend_is_left_out():
    """The timed calls alternate between the candidates (a warm-up round, then REPEATS rounds), so a slow spell
    of the machine meets them all, each after the untimed `before` work; a candidate that raises
    NotImplementedError (a backend torch lacks) is left out and what it made is released at once; the others'
    releases come back with their times."""
    calls, released = [], []

    def path(name: str, fails: bool = False):
        def run() -> None:
            calls.append(name)
            tune.made_while_timing(lambda: released.append(name))
            if fails:
                raise NotImplementedError("no such backend")
        return run

    timed = tune._time({"a": path("a"), "b": path("b"), "c": path("c", fails=True)}, "k",
                       before=lambda: calls.append("before"))
    assert calls == [c for name in ["a", "b", "c"] + ["a", "b"] * tune.REPEATS for c in ("before", name)]
    assert set(timed) == {"a", "b"} and released == ["c"]
    assert all(t >= 0 and len(made) == tune.REPEATS + 1 for t, made in timed.values())


def test_tuning_off_takes_the_default_without_timing(monkeypatch):
    monkeypatch.setenv("QUILL_TUNE", "0")

    def never() -> None:
        raise AssertionError("timed with QUILL_TUNE=0")

    assert tune.choose("avx2", "k", {"quill": never, "torch": never}, "torch") == "torch"


@pytest.mark.skipif(not kernels.available(), reason="quill kernels unavailable")
def test_an_inexact_path_must_be_clearly_faster_to_win(tuning, monkeypatch):
    """fbgemm's 7-bit activations cost accuracy: the tuner takes it only when more than INEXACT_MARGIN times
    faster than the fastest exact candidate (timings stand in for the clock here)."""
    cost = {"exact": 1.0, "inexact": 0.0}
    monkeypatch.setattr(tune, "_time",
                        lambda candidates, key, before=None: {n: (cost[fn()], []) for n, fn in candidates.items()})
    paths = {"exact": lambda: "exact", "inexact": lambda: "inexact"}
    cost["inexact"] = 1.05 / tune.INEXACT_MARGIN  # faster, not by the margin
    assert tune.choose("avx2", "a", paths, "exact", inexact=("inexact",)) == "exact"
    cost["inexact"] = 0.9 / tune.INEXACT_MARGIN  # beyond the margin
    assert tune.choose("avx2", "b", paths, "exact", inexact=("inexact",)) == "inexact"
    assert tune.choose("avx2", "c", paths, "exact") == "inexact"  # no penalty without the mark
    assert [tune.row_class(n) for n in (1, 2, 3, 8, 9, 512, 513)] == [1, 2, 4, 8, 16, 512, 1024]


def test_info_system_prints_the_flags_and_the_variant(capsys, monkeypatch):
    from quill.cli import main

    assert main(["info", "--system"]) == 0
    report = json.loads(capsys.readouterr().out)["system"]
    cpu = this_cpu()
    assert report["cpu"] == cpu.model and set(report["flags"]) <= cpu.flags
    chosen = choose_variant(cpu, "auto")
    assert report["variant"] == (chosen.name if chosen and kernels.available() else None)
    monkeypatch.setenv("QUILL_ISA", "avx1024")
    kernels.reload()
    try:
        assert main(["info", "--system"]) == 0  # a diagnostic: it reports the bad setting instead of failing
        assert "not a kernel variant" in json.loads(capsys.readouterr().out)["system"]["error"]
    finally:
        monkeypatch.undo()
        kernels.reload()
    assert main(["info"]) == 2 and "needs a MODEL" in capsys.readouterr().err
