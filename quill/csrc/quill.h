/* Quill kernels: the constants C and Python share, defined once here.

   quill/kernels reads every `#define QK_<NAME> <integer>` line of this file (quill.kernels.abi), so the
   Python side never repeats a number: keep each on one line as `#define QK_NAME value` with a plain integer. */
#ifndef QUILL_H
#define QUILL_H

/* element types of tensors handed to the kernels */
#define QK_F32 0
#define QK_BF16 1
#define QK_F16 2
#define QK_I8 3

/* activations fused into a projection's epilogue */
#define QK_ACT_NONE 0
#define QK_ACT_GELU_TANH 1
#define QK_ACT_GELU_ERF 2
#define QK_ACT_RELU 3

/* the int8 GEMM's packed weights (quill_gemm_i8), per variant: panels of QK_I8_PANEL_* output columns,
   QK_I8_GROUP_* panels a register block (N is padded to a multiple of their product), K padded to a multiple
   of QK_I8_KSTEP */
#define QK_I8_PANEL_AVX2 8
#define QK_I8_GROUP_AVX2 3
#define QK_I8_PANEL_AVX512 16
#define QK_I8_GROUP_AVX512 4
#define QK_I8_KSTEP 2

/* the u8 x int8 GEMM's packed weights (quill_gemm_u8i8, AVX-512 VNNI): panels of QK_U8_PANEL columns with
   QK_U8_KSTEP consecutive K values of a column side by side, QK_U8_GROUP panels a register block;
   K at most QK_U8_MAX_K (exact int32 sums) */
#define QK_U8_PANEL 16
#define QK_U8_GROUP 4
#define QK_U8_KSTEP 4
#define QK_U8_MAX_K 32767
/* the bf16 GEMM's packed weights (quill_gemm_bf16, AVX-512 BF16): the same layout with QK_BF16_PANEL columns */
#define QK_BF16_PANEL 16
#define QK_BF16_GROUP 4
#define QK_BF16_KSTEP 2

/* banned ids per row that quill_argmax_banned takes */
#define QK_MAX_BANS 64

/* ---- the decode plan: the int64 words quill_decode_step reads (pointers, dtypes, sizes; floats as their
   bit patterns). A header of QK_PLAN_HEADER words, then QK_PLAN_LAYER words per block. A projection is six
   words (QK_LIN_*; SUMS: an int8 weight's row sums where its rows may be rounded to u8, else 0), a LayerNorm
   three (QK_NORM_*), both at the offset named. */
#define QK_PLAN_N_LAYER 0
#define QK_PLAN_C 1
#define QK_PLAN_H 2
#define QK_PLAN_INNER 3
#define QK_PLAN_V 4
#define QK_PLAN_ACT 5
#define QK_PLAN_DTYPE 6
#define QK_PLAN_EPS 7
#define QK_PLAN_WTE 8
#define QK_PLAN_WTE_DTYPE 9
#define QK_PLAN_WPE 10
#define QK_PLAN_WPE_DTYPE 11
#define QK_PLAN_LN_F 12
#define QK_PLAN_LM_HEAD 15
#define QK_PLAN_HEADER 24

#define QK_LAYER_LN_1 0
#define QK_LAYER_QKV 3
#define QK_LAYER_ATTN_PROJ 9
#define QK_LAYER_LN_2 15
#define QK_LAYER_FC 18
#define QK_LAYER_MLP_PROJ 24
#define QK_LAYER_ATTN_SCALE 30
#define QK_PLAN_LAYER 31

#define QK_LIN_WEIGHT 0
#define QK_LIN_DTYPE 1
#define QK_LIN_SCALE 2
#define QK_LIN_BIAS 3
#define QK_LIN_BIAS_DTYPE 4
#define QK_LIN_SUMS 5
#define QK_LIN_WORDS 6

#define QK_NORM_WEIGHT 0
#define QK_NORM_BIAS 1
#define QK_NORM_DTYPE 2
#define QK_NORM_WORDS 3

#endif
