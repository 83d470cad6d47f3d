"""Write a random-weight NeMo checkpoint of a Nemotron-like architecture, for `monosemantic bench`.

    python benchmarks/make_model.py --arch reduced --out /tmp/reduced.nemo
    python benchmarks/make_model.py --arch full --out /tmp/full.nemo --no-calibrate

Calibration (default on) tunes the random weights so greedy decoding of speech emits a realistic token
rate (as the test checkpoints do), which matters for decoding cost; it takes a minute on a laptop for the
reduced architecture. Needs the `nemo` extra.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _support.nemo_checkpoints import VARIANTS, build_model, model_config, quiet_nemo, train_tokenizer  # noqa: E402
from archs import ARCHS  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=sorted(ARCHS), default="reduced")
    parser.add_argument("--out", required=True)
    parser.add_argument("--calibrate", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()
    variant = replace(VARIANTS["nemotron_rnnt"], name=f"bench_{args.arch}", **ARCHS[args.arch])
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = train_tokenizer(Path(tmp) / "tokenizer")
        if args.calibrate:
            model = build_model(variant, tokenizer)
        else:
            import torch
            from nemo.collections.asr.models import EncDecRNNTBPEModel
            from omegaconf import OmegaConf

            torch.manual_seed(0)
            with quiet_nemo():
                model = EncDecRNNTBPEModel(cfg=OmegaConf.create(model_config(variant, tokenizer))).eval()
        with quiet_nemo():
            model.save_to(args.out)
    print(args.out)


if __name__ == "__main__":
    main()
