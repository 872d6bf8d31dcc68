"""Records NVIDIA's own `AlpamayoR1` in bfloat16 under autocast on the tiny fixture: the reference
run of the bfloat16 test's second table (`tests/test_bfloat16.py`, `tests/fixtures/bfloat16_autocast/`).

Loads the fixture checkpoint with NVIDIA's `AlpamayoR1.from_pretrained(dtype=bfloat16)` and runs
`verify_bfloat16.reference_run` through it (`nvidia_reference`: its vision tower and language
model, its action projections, its flow-matching sampler with the noise injected), twice; the two
runs must agree bit for bit. Saves the outputs to OUT/reference.npz and what was run (versions,
inputs, command) to OUT/reference.json.

Needs an NVlabs/alpamayo source tree and the packages its code imports (`verify --stage 2`'s
list) on PYTHONPATH; never run by the tests. Nothing touches the network (HF_HUB_OFFLINE is set
and sockets refuse to connect). Run from the repository root:

    PYTHONPATH=DIR python convert/record_bfloat16_fixture.py --reference-src ALPAMAYO_TREE \
        --out tests/fixtures/bfloat16_autocast
"""

from __future__ import annotations

import argparse
from pathlib import Path

from alpamayo_reference.recording import reference_commit, refuse_network, write_record

refuse_network()

import numpy as np  # noqa: E402

FIXTURE = Path(__file__).parents[1] / "tests" / "fixtures" / "tiny_ar1_dev"
SEED, IMAGE_SIZE, DECODE_STEPS = 0, (64, 96), 8  # verify_bfloat16's defaults


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference-src", type=Path, required=True, help="an NVlabs/alpamayo source tree")
    parser.add_argument("--out", type=Path, required=True, help="fixture directory (reference.npz, reference.json)")
    parser.add_argument("--reference-commit", help="NVlabs/alpamayo commit of the reference source "
                                                   "(default: asked of git where the source is a checkout)")
    args = parser.parse_args()

    import torch

    from alpamayo_reference.verify_bfloat16 import reference_run

    def run() -> dict[str, np.ndarray]:
        return reference_run(FIXTURE / "hf", processor_dir=FIXTURE / "vlm", reference_src=args.reference_src,
                             seed=SEED, image_size=IMAGE_SIZE, decode_steps=DECODE_STEPS)

    torch.set_num_threads(2)
    first, second = run(), run()
    for name in first:
        if not np.array_equal(first[name], second[name]):
            raise RuntimeError(f"{name} differs between two runs")
    args.out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out / "reference.npz", **first)

    write_record(args.out, {
        "checkpoint": "tests/fixtures/tiny_ar1_dev (hf/, vlm/)",
        "inputs": {"seed": SEED, "image_size": list(IMAGE_SIZE), "decode_steps": DECODE_STEPS},
        "arrays": {name: {"shape": list(value.shape), "dtype": str(value.dtype)} for name, value in first.items()},
        "versions": {"torch_num_threads": torch.get_num_threads()},
    }, packages=("torch", "transformers", "numpy"),
        commit=args.reference_commit or reference_commit(args.reference_src),
        command="PYTHONPATH=DIR python convert/record_bfloat16_fixture.py")
    print(f"recorded {len(first)} arrays into {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
