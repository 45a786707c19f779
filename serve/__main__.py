"""`python -m serve [key=value ...]`: the conversation server (Hydra config: configs/serve.yaml)."""

import asyncio
import logging

import hydra
from omegaconf import DictConfig, OmegaConf

from csm_jax.conversation import StoreError
from csm_jax.serving import ServeConfig, serve_forever


@hydra.main(version_base="1.3", config_path="../configs", config_name="serve")
def main(cfg: DictConfig) -> None:
    logging.getLogger("csm_jax").setLevel(logging.INFO)
    logging.getLogger("jax").setLevel(logging.WARNING)  # not its INFO lines about backends this machine lacks
    config = ServeConfig.from_dict(OmegaConf.to_container(cfg, resolve=True))
    try:
        asyncio.run(serve_forever(config))
    except KeyboardInterrupt:
        pass
    except StoreError as e:  # an unreachable, damaged or read-only database: one clear line, exit status 1
        raise SystemExit(f"csm-jax: {e}") from None


if __name__ == "__main__":
    main()
