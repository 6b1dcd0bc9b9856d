"""On paper: a 70 B Llama trained with zeroth-order steps under FSDP2 on 8 x 80 GB GPUs.

No GPU runs this; it counts bytes from the model's shapes (Llama-3-70B: hidden 8192, 80
blocks, MLP 28672, 64 query and 8 key/value heads of 128, vocabulary 128256) and the way
``trainer=fsdp`` runs an update (zopro_lightning/utils/sharding.py, zo/layerwise.py,
policy/reference.py). Per rank, per update:

- memory: the bf16 shard of the weights; FSDP's gathered blocks (the running one and the next,
  prefetched); the layer-by-layer substitute of the largest matrix (bf16) and its ``z`` drawn
  whole in float32 (on a GPU one generator fills the tensor); the update's float32 temporaries
  for one tensor (``z``, the sum, the rounding bits); the KV cache of the rollout and the
  logits of one micro-batch. The reference's weights stay in the host's page cache (a
  memory-mapped file) and cross PCIe one block at a time.
- traffic: every forward over the sharded model gathers (world - 1) / world of the weights
  on each rank: one a generated token, then the policy's log-probs and the two evaluations; the
  reference's forward reads the host file instead; the step's all-reduce is 3 q float64.

Run: ``python bench/fsdp_paper.py`` -> bench/results/fsdp_paper.json.
"""

from __future__ import annotations

import argparse

from common import environment, write_results

GB = 1e9


def llama_70b() -> dict[str, int]:
    return {"hidden": 8192, "blocks": 80, "mlp": 28672, "heads": 64, "kv_heads": 8,
            "head_dim": 128, "vocab": 128256}  # fmt: skip


def parameter_counts(m: dict[str, int]) -> dict[str, int]:
    h, kv = m["hidden"], m["kv_heads"] * m["head_dim"]
    block = 2 * h * h + 2 * h * kv + 3 * h * m["mlp"] + 2 * h  # q, o, k, v, MLP, two norms
    embeddings = 2 * m["vocab"] * h  # input and output embeddings, untied
    return {"block": block, "total": m["blocks"] * block + embeddings + h,
            "largest_matrix": max(h * m["mlp"], m["vocab"] * h)}  # fmt: skip


def per_rank(m: dict[str, int], world: int, sequences: int, tokens: int, new_tokens: int,
             micro_batch: int, q: int) -> dict[str, float]:  # fmt: skip
    counts = parameter_counts(m)
    bf16, fp32 = 2, 4
    shard = counts["total"] * bf16 / world
    gathered_blocks = 2 * counts["block"] * bf16
    substitute = counts["largest_matrix"] * (bf16 + fp32)  # theta + eps z, and z
    update_temporaries = counts["largest_matrix"] * 3 * fp32  # z, the sum, the rounding bits
    kv_cache = m["blocks"] * 2 * m["kv_heads"] * m["head_dim"] * bf16 * sequences * tokens
    logits = micro_batch * tokens * m["vocab"] * fp32
    peak = shard + gathered_blocks + max(substitute, update_temporaries) + kv_cache + logits
    gathered_per_forward = counts["total"] * bf16 * (world - 1) / world
    forwards = new_tokens + 3  # generation, old log-probs, L+ and L-
    adamw = counts["total"] * (bf16 + bf16 + 3 * fp32) / world  # weights, grads, master, 2 moments
    return {
        "parameters": counts["total"],
        "weights_shard_GB": shard / GB,
        "gathered_blocks_GB": gathered_blocks / GB,
        "layerwise_substitute_GB": substitute / GB,
        "update_temporaries_GB": update_temporaries / GB,
        "kv_cache_GB": kv_cache / GB,
        "logits_micro_batch_GB": logits / GB,
        "zeroth_order_peak_GB": peak / GB,
        "adamw_states_per_rank_GB": adamw / GB,
        "all_gathered_per_update_GB": forwards * gathered_per_forward / GB,
        "of_which_generation_GB": new_tokens * gathered_per_forward / GB,
        "reference_host_to_device_GB": counts["total"] * bf16 / GB,
        "all_reduce_bytes": 3 * q * 8,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--world", type=int, default=8)
    parser.add_argument("--sequences", type=int, default=16, help="rollout rows a rank")
    parser.add_argument("--tokens", type=int, default=512, help="prompt + completion")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--q", type=int, default=1)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    model = llama_70b()
    figures = per_rank(model, args.world, args.sequences, args.tokens, args.new_tokens,
                       args.micro_batch, args.q)  # fmt: skip
    for key, value in figures.items():
        print(f"{key:32s} {value:,.2f}" if isinstance(value, float) else f"{key:32s} {value:,}")
    payload = {"environment": environment(), "model": model, "settings": vars(args),
               "per_rank": figures}  # fmt: skip
    write_results("fsdp_paper", payload, args.out)


if __name__ == "__main__":
    main()
