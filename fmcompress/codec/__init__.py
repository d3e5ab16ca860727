"""Lossless coding of int8 feature-map planes: a per-plane baseline and DC-AC.

DC-AC (ISCAS 2021, "Deep correlation-based adaptive compression of feature map
planes") codes each plane (one channel's H x W) as the residual from the most similar
of the previous W planes of the same map, or on its own. `encode`/`decode` implement it
and a baseline that differs only in that step; `measure_model` runs a model in
onnxruntime and reports the bits per element of its stored maps. docs/codec.md has the
stream format and how to read the figures.

Modules, one job each: symbols (the alphabet, rule c), planes (rules a and b),
references (rule e (1)), tables (model tables and the coder's models), clustering
(rule d), bitpack (bit packing), stream (the byte layout), encoder and decoder (rules e
(2, 3), f and g), jit (the decoder's compiled kernels, optional), quantization (float
maps to int8) and measure (bits per element of a model's maps).

Rules:

a. Planes. An int8 array of shape [..., C, H, W] holds G x C planes of H x W, G the
   product of the leading dims; references stay inside one run of C planes (one
   sample). A 2-D array [H, W] is one plane; a 1-D array [L] is one plane of one row;
   a 0-D array is one 1x1 plane. Any size is allowed, empty ones included.
b. Residuals wrap around: r = (x - x_ref) mod 256 on the int8 bit patterns, so the
   alphabet stays at 256 symbols and x = (r + x_ref) mod 256 is exact.
c. Symbols. A value v (int8, or a residual read as int8) becomes a token of a 32-letter
   alphabet plus raw extra bits, sign and magnitude m = |v| apart: v = 0 is token 0;
   0 < m < 8 is its own token (2m - 1, or 2m when negative); 8 <= m < 128 falls in one
   of 8 buckets (the exponent of m and the bit after its leading one) with the sign,
   tokens 15..30, and m's low e - 1 bits (2..5, e = floor(log2 m)) are stored verbatim;
   v = -128 is token 31. The small alphabet keeps a model at 32 entries and the range
   search of constriction's decoder short (256-letter tables decode far slower); the
   sign sits in the token, so nonnegative (ReLU) maps waste no bit on it.
d. Models. Planes whose tokens are all one token without extra bits (all-zero planes) are
   "constant" and cost only their model index. The others are clustered into K shared
   token models (K in 1, 2, 4, ... 32, the one with the fewest total bits counting the
   tables and the indices). All K run at once: each starts from a split of the planes
   sorted by mean token, takes LLOYD_ROUNDS assignment steps (each plane to the model
   with the smallest cross-entropy, the models from their planes' histograms), and is
   scored with the tables built from its final assignment. A model is written as 32
   five-bit codes: 0 for an unused token, else 1..31 for a frequency of
   2^((code - 31) / 2) relative to the most frequent token.
e. Reference choice (dcac), three steps. (1) For each non-constant plane, among "none" and
   the non-constant planes of the previous W, the option with the smallest estimated code
   length: the empirical entropy of its tokens (Miller-Madow corrected) plus its extra
   bits, on evenly spaced sample positions (the same in every plane), all candidates in
   one bincount; a residual must beat "none" by REF_MARGIN. Where the candidates would
   hold more sampled tokens than REF_BUDGET of the map's elements (many small planes), an
   evenly spread subset within that budget is estimated first, and the map gets no
   reference unless those save REF_SCREEN of the subset's estimated bits. The L1 norm of
   the residual (or any per-symbol magnitude proxy) picks worse references: a sparse
   plane minus another sparse plane is less sparse, and a shifted residual costs no more
   than an unshifted one. (2) A reference is kept only where the residual (tokens and
   extra bits) costs less than the plane under the cheapest of: the plain planes' shared
   models, one model of all the chosen residuals, and those refitted (one Lloyd step) to
   the chosen symbols; the stream's models are refitted (one Lloyd step) from all of them
   to the kept symbols. (3) The stream with references is written only if its estimated
   size (token cross-entropy under the tables, tables, indices, extra bits: within a few
   bytes of the real one) is smaller than that of the stream without; only one stream is
   ever encoded. A stream that uses no reference carries neither the reference table nor
   the indices (REFS_FLAG), so dcac then costs exactly what the baseline costs.
f. Entropy coder: constriction's ANS coder with categorical models built from the
   written tables (perfect=False), one call per model over all its planes (coding order:
   by model, plane order within). A model whose table gives token 0 a probability p of at
   least SPLIT_ZERO codes zero flags, four to a symbol of a 16-letter model (the product
   p^zeros (1 - p)^ones: the bits of four single flags), then only the nonzero tokens
   under the table without token 0: the same information, but the decoder searches a
   16-letter table per four elements and the 32-letter one only for the nonzero ones.
   Extra bits are bit-packed grouped by width (2, 3, 4, 5), each group in coding order,
   so that each group is packed and read at a fixed width.
g. Decoding checks the magic, version and a CRC-32 of the whole stream first, then
   every count it reads, and raises InputError for anything wrong: a damaged stream is
   never decoded into a wrong array.
"""

from .decoder import compiled_kernels, decode
from .encoder import encode, encode_with_refs
from .measure import (
    SCHEMA_VERSION,
    ZSTD_LEVEL,
    CodecReport,
    CodecRow,
    coded_maps,
    measure_model,
    zstd_bits,
)
from .quantization import calibrate_scale, quantize
from .references import choose_references
from .stream import HEADER, MAGIC, MAX_WINDOW, METHODS, VERSION

__all__ = [
    "HEADER", "MAGIC", "MAX_WINDOW", "METHODS", "SCHEMA_VERSION", "VERSION", "ZSTD_LEVEL",
    "CodecReport", "CodecRow", "calibrate_scale", "choose_references", "coded_maps",
    "compiled_kernels", "decode", "encode", "encode_with_refs", "measure_model", "quantize",
    "zstd_bits",
]
