"""Generate text with tree speculative decoding and print it with the run's statistics.

    python scripts/generate.py                                  # the demo pair, default prompt
    python scripts/generate.py prompt="Write a haiku" decoding.method=chain
    python scripts/generate.py decoding=sampling decoding.temperature=1.0 tree_search=static
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from speculative_decoder import SpeculativeDecoder, SpeculativeDecodingConfig  # noqa: E402


def run(cfg: DictConfig) -> dict:
    config = SpeculativeDecodingConfig.from_hydra(cfg)
    decoder = SpeculativeDecoder(config)
    print(f"prompt: {cfg.prompt}\n", flush=True)
    for piece in decoder.stream(cfg.prompt):
        print(piece, end="", flush=True)
    stats = decoder.last_stats.as_dict()
    print("\n\n" + json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in stats.items()
                               if k != "time_s"}, indent=1))
    print("time_s:", {k: round(v, 3) for k, v in stats["time_s"].items()})
    return stats


@hydra.main(version_base="1.3", config_path="../configs", config_name="config")
def main(cfg: DictConfig) -> float:
    return run(cfg)["tokens_per_s"]


if __name__ == "__main__":
    main()
