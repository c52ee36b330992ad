"""Calibration data: token samples, sensitivity tokens and held-out windows from one text file."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


@dataclass
class CalibData:
    samples: torch.Tensor  # [S, L] from the start of the file
    sens: torch.Tensor  # [T_s] right after the samples
    heldout: torch.Tensor  # [H, L_h] from the end of the file (disjoint from the above)
    file: Path
    total_tokens: int


def load_calib_data(tokenizer: Any, path: Path, samples: int, seq_len: int, sens_tokens: int,
                    heldout_windows: int, heldout_len: int) -> CalibData:
    if not path.is_file():
        raise FileNotFoundError(f"calibration file {path} not found (pass --calib-file PATH)")
    ids = tokenizer(path.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    need_front = samples * seq_len + sens_tokens
    need_back = heldout_windows * heldout_len
    if len(ids) < need_front + need_back:
        raise ValueError(f"{path} has {len(ids)} tokens; {samples}x{seq_len} samples + {sens_tokens} sensitivity "
                         f"tokens + {heldout_windows}x{heldout_len} held-out tokens need {need_front + need_back}")
    ids_t = torch.tensor(ids, dtype=torch.int64)
    front = ids_t[: samples * seq_len].view(samples, seq_len)
    sens = ids_t[samples * seq_len : need_front]
    back = ids_t[len(ids) - need_back :].view(heldout_windows, heldout_len) if need_back else ids_t[:0].view(0, 1)
    return CalibData(front, sens, back, path, len(ids))
