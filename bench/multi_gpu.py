"""One GRPO step on N trainer ranks (DDP or FSDP2 through accelerate) against one rank: same loss,
same gradient norm, same gathered weights. One JSON line per run.

    python bench/multi_gpu.py --ref /tmp/mg                                         # 1 GPU: the reference
    accelerate launch --multi_gpu --num_processes 2 bench/multi_gpu.py --ref /tmp/mg  # DDP, compared to it
    accelerate launch --use_fsdp --fsdp_version 2 --fsdp_auto_wrap_policy TRANSFORMER_BASED_WRAP \\
        --fsdp_transformer_layer_cls_to_wrap Qwen2DecoderLayer --fsdp_state_dict_type FULL_STATE_DICT \\
        --num_processes 2 bench/multi_gpu.py --ref /tmp/mg                          # FSDP2

Each rank takes its share of the prompts as train.py does (prompts[rank::world]) and runs
train.policy_step, the trainer's own step, with SGD so that the weight change is the (all-reduced)
gradient itself. Rank 0 then gathers the full weights with accelerate's get_state_dict, the call
train.py's push_weights makes before a weight sync, and compares them with the reference run's.
"""
import argparse
import json
import math
import os
import random
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from system import batches, models, run  # noqa: E402
import train  # noqa: E402
from system.config import make  # noqa: E402
from system.models import SHAPES, load_model  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="qwen0.5b", choices=sorted(SHAPES), help="random:<shape> model")
    ap.add_argument("--prompts", type=int, default=16, help="prompts in the batch, over all ranks")
    ap.add_argument("--group", type=int, default=4, help="completions per prompt")
    ap.add_argument("--lr", type=float, default=1.0, help="learning rate of the one step (large: weights move visibly)")
    ap.add_argument("--ref", required=True, help="folder of the 1-rank reference: written by a 1-rank run, else read")
    a = ap.parse_args()
    from accelerate import Accelerator

    gpu = torch.cuda.is_available()
    acc = Accelerator(cpu=not gpu, mixed_precision="bf16" if gpu else "no", fsdp_plugin=run.fsdp_plugin())
    rank, world = acc.process_index, acc.num_processes
    torch.manual_seed(0)
    lm = models.use_packed_attention(load_model(f"random:{a.shape}", torch.float32, acc.device))
    init = {k: v.detach().cpu().clone() for k, v in lm.state_dict().items()} if rank == 0 else None
    rng = random.Random(0)
    vocab = lm.config.vocab_size
    prompts = [[rng.randrange(2, vocab) for _ in range(rng.randint(150, 250))] for _ in range(a.prompts)]
    comps = [[{"token_ids": (ids := [rng.randrange(2, vocab) for _ in range(rng.randint(50, 400))]),
               "logprobs": [-math.log(vocab)] * len(ids)} for _ in range(a.group)] for _ in prompts]  # ratio ~ 1
    adv = torch.randn(a.prompts, a.group, generator=torch.Generator().manual_seed(0))
    mine = list(range(a.prompts))[rank::world]  # this rank's prompts, as train.py splits them
    seq_prompts = [prompts[i] for i in mine for _ in range(a.group)]
    completions = [c for i in mine for c in comps[i]]
    cfg = make(train.Config, dict(prompts_per_step=a.prompts, group_size=a.group, micro_batch_size=8, grad_clip=1e9))

    opt = torch.optim.SGD(lm.parameters(), lr=a.lr)
    policy, opt = acc.prepare(batches.Policy(lm), opt)
    run.check_prepared(acc, policy, opt)  # lm_head still tied, every parameter in opt
    stats, _ = train.policy_step(acc, policy, None, opt, seq_prompts, completions,
                                 adv[mine].flatten().to(acc.device), cfg, pad_id=0)
    loss, grad_norm = acc.reduce(stats["loss"], "mean").item(), float(stats["grad_norm"])
    full = acc.get_state_dict(policy)  # every rank takes part; rank 0 gets the full weights
    if rank == 0:
        report(a, acc, gpu, loss, grad_norm, full, init)
    acc.wait_for_everyone()  # no rank exits while rank 0 still works: an early exit (gloo) aborts, and the launcher
    acc.end_training()       # then kills rank 0 before it prints
    run.exit_gloo_rank()


def report(a, acc, gpu, loss, grad_norm, full, init):
    world = acc.num_processes
    delta = {k.removeprefix("lm."): v.float().cpu() - init[k.removeprefix("lm.")] for k, v in full.items()}
    out = {"bench": "multi_gpu", "device": torch.cuda.get_device_name() if gpu else "cpu", "world": world,
           "distributed": str(acc.distributed_type).split(".")[-1], "shape": a.shape, "loss": loss, "grad_norm": grad_norm}
    if world == 1:
        os.makedirs(a.ref, exist_ok=True)
        torch.save(delta, os.path.join(a.ref, "delta.pt"))
        json.dump(out, open(os.path.join(a.ref, "ref.json"), "w"))
    else:
        ref = json.load(open(os.path.join(a.ref, "ref.json")))
        ref_delta = torch.load(os.path.join(a.ref, "delta.pt"))
        assert ref_delta.keys() == delta.keys(), f"gathered names differ: {sorted(ref_delta.keys() ^ delta.keys())[:5]}"
        err = {k: ((delta[k] - ref_delta[k]).norm() / ref_delta[k].norm().clamp(min=1e-12)).item() for k in delta}
        worst = max(err, key=err.get)
        out |= {"ref_loss": ref["loss"], "loss_rel_diff": abs(loss - ref["loss"]) / abs(ref["loss"]),
                "grad_norm_rel_diff": abs(grad_norm - ref["grad_norm"]) / ref["grad_norm"],
                "weights_rel_err_median": sorted(err.values())[len(err) // 2], "weights_rel_err_max": err[worst],
                "worst_tensor": worst, "tensors": len(delta), "bad_tensors": [k for k in err if err[k] > 0.05][:6],
                "unchanged_tensors": sum(bool((d == 0).all()) for d in delta.values())}
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
