"""What nested GPTQ buys the lm_head, width by width: the lm_head alone quantized, the decoder exact.

The final-norm hidden states of the unquantized default model are computed once, on the calibration samples
(16 x 256 tokens of valid.txt: the Hessian) and on held-out windows of test.txt (8 x 512 tokens from 60 % of
its tokens on); each variant's lm_head is then scored by its logits alone. Variants: the calibrated pipeline's
lm_head (codes anchored at 4 bits, activation-weighted least-squares affines, w8 plain) and `nested_gptq` on
those codes' affines with several width weights (`lam_b`, absolute weight units).

    python benchmarks/lm_head_gptq.py --out benchmarks/results/lm_head_gptq.json
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quept.build.calibration.blockwise import dense_block_output, rope_tables  # noqa: E402
from quept.build.calibration.data import load_calib_data  # noqa: E402
from quept.build.calibration.gptq import nested_gptq  # noqa: E402
from quept.build.calibration.master_codes import master_code_search, nested_codes_float  # noqa: E402
from quept.build.source import load_source  # noqa: E402
from quept.data import calib_file, eval_file  # noqa: E402
from quept.eval.perplexity import token_windows  # noqa: E402
from quept.model.args import LINEAR_NAMES  # noqa: E402
from quept.model.layer_ops import rms_norm  # noqa: E402

WIDTHS = (8, 6, 5, 4, 3, 2)
GROUP = 32
VARIANTS: dict[str, dict[int, float] | None] = {
    "gptq lam=1": None,
    "gptq lam 8,6,5:4 4:16 3,2:1": {8: 4, 6: 4, 5: 4, 4: 16, 3: 1, 2: 1},
    "gptq w4 only (lam 4:100)": {8: 1, 6: 1, 5: 1, 4: 100, 3: 1e-3, 2: 1e-3},
}


def final_hidden(src, tokens: torch.Tensor) -> torch.Tensor:
    """Final-norm hidden states of the unquantized model for tokens [S, L]: [S, L, D]."""
    st, args = src.state, src.args
    s, l = tokens.shape
    cos, sin = rope_tables(args, l)
    x = st["model.embed_tokens.weight"].index_select(0, tokens.flatten()).float().view(s, l, -1)  # [S, L, D]
    for i in range(args.n_layers):
        dense = [st[f"model.layers.{i}.{n}.weight"].float() for n in LINEAR_NAMES]
        norms = (st[f"model.layers.{i}.input_layernorm.weight"].float(),
                 st[f"model.layers.{i}.post_attention_layernorm.weight"].float())
        x = dense_block_output(dense, [None] * len(dense), x, norms, args, cos, sin)
    return rms_norm(x, st["model.norm.weight"].float(), args.rms_norm_eps)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--start", type=float, default=0.6)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/lm_head_gptq.json"))
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    src = load_source(None)
    samples = load_calib_data(src.tokenizer, calib_file(), 16, 256, 0, 0, 1).samples
    windows = token_windows(src.tokenizer, eval_file(), a.windows, 512, a.start)
    with torch.no_grad():
        h_cal = final_hidden(src, samples).flatten(0, 1)  # [T, D]
        h_eval = final_hidden(src, windows)  # [W, L, D]
    w = src.state["lm_head.weight"].float()
    hessian = (h_cal.double().T @ h_cal.double()).float()

    def ppl(weight: torch.Tensor) -> float:
        logits = h_eval @ weight.T  # [W, L, V]
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
        return round(math.exp(float(nll)), 3)

    def per_width(codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor) -> dict[str, float]:
        q = nested_codes_float(codes, WIDTHS).view(len(WIDTHS), w.shape[0], -1, GROUP)  # [W, N, K/G, G]
        deq = (q * scales.unsqueeze(-1) + mins.unsqueeze(-1)).view(len(WIDTHS), *w.shape)
        return {f"w{b}": ppl(deq[i]) for i, b in enumerate(WIDTHS)}

    codes, scales, mins = master_code_search(w, WIDTHS, GROUP, h_cal.pow(2).mean(0) + 1e-8, iters=0,
                                             plain_widths=(8,), anchor_bits=4)
    rows = {"unquantized": {"ppl": ppl(w)}, "pipeline (anchored codes, weighted LS)": {"ppl": per_width(codes, scales, mins)}}
    print(rows, flush=True)
    for name, lam in VARIANTS.items():
        t0 = time.perf_counter()
        gcodes = nested_gptq(w, hessian, scales, mins, WIDTHS, GROUP, lam)
        rows[name] = {"ppl": per_width(gcodes, scales, mins), "seconds": round(time.perf_counter() - t0, 1)}
        print(name, rows[name], flush=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({
        "command": "python " + " ".join(shlex.quote(x) for x in sys.argv),
        "protocol": {"what": "only the lm_head quantized (decoder exact), scored by its logits",
                     "eval": f"{a.windows} windows x 512 tokens of test.txt from {a.start:.0%} of its tokens on",
                     "hessian": "final-norm states of 16 x 256 tokens of valid.txt", "group_size": GROUP,
                     "threads": torch.get_num_threads()},
        "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
