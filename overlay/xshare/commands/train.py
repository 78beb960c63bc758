"""``xshare train-tiny``: train, check, evaluate and profile the tiny MoE models on synthetic tasks.

    xshare train-tiny                              # train into the cache unless already there; print the manifest
    xshare train-tiny --router deepseek_v3         # the aux-loss-free GLM-4.5-architecture model (DeepSeek-V3's router)
    xshare train-tiny --model-dir DIR --force      # (re)train into DIR
    xshare train-tiny --check                      # retrain fully and compare the weights' hash with the manifest
    xshare train-tiny --eval --policy topk --policy xshare --budget 8 --budget 12 --json out.json
    xshare train-tiny --profile                    # share of an HF decode step spent in the MoE layers

See docs/model.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

NAME = "train-tiny"
HELP = ("train (or load) a tiny MoE model on synthetic tasks (Qwen3-MoE, or --router deepseek_v3: aux-loss-free "
        "GLM-4.5); --check, --eval (offline, per policy), --profile")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from xshare.models.config import ROUTERS

    p.add_argument("--router", choices=list(ROUTERS), default="softmax",
                   help="which trained model: softmax (default: the Qwen3-MoE model, load-balancing loss) or "
                        "deepseek_v3 (GLM-4.5 architecture with DeepSeek-V3's grouped sigmoid router, balanced by its "
                        "correction bias without an auxiliary loss); --check and --eval read the model's manifest")
    p.add_argument("--model-dir", metavar="DIR",
                   help="model directory (default: $XSHARE_TINY_MODEL or $XSHARE_CACHE_DIR/tiny-moe-<config hash>; "
                        "--router deepseek_v3: $XSHARE_TINY_AUXFREE_MODEL or $XSHARE_CACHE_DIR/tiny-auxfree-<hash>)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a TinyConfig field (repeatable), e.g. --set steps=500 --set threads=1")
    p.add_argument("--force", action="store_true", help="retrain even if the directory holds this model")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true",
                      help="retrain from the manifest's config and compare the weights' SHA-256 (exit 1 if different)")
    mode.add_argument("--eval", action="store_true", help="offline exact match per policy/budget (HF, greedy)")
    mode.add_argument("--profile", action="store_true", help="time the MoE blocks in HF decode steps")
    g = p.add_argument_group("--eval / --profile")
    g.add_argument("--policy", action="append", metavar="NAME",
                   help="selection policy (repeatable; 'off' = the model's own routing; default: off, xshare)")
    g.add_argument("--budget", action="append", metavar="M",
                   help="experts per layer: int or fraction of E (repeatable; default 0.5); ignored by off/topk")
    g.add_argument("--warmup-k", type=int, default=1, help="warm-up k0 of the budgeted policies (default 1)")
    g.add_argument("--oea-k0", type=int, action="append", metavar="K0",
                   help="k0 of oea / des_seq, which have no budget (repeatable; default 1 and 2)")
    g.add_argument("--problems", type=int, default=500, help="held-out problems (default 500, tasks balanced)")
    g.add_argument("--seed", type=int, default=0, help="held-out sample seed (default 0)")
    g.add_argument("--batch-size", type=int, default=16, help="decode batch size (default 16)")
    g.add_argument("--select-prefill", action="store_true", help="also apply the policy to prefill")
    g.add_argument("--json", metavar="FILE", help="write the results as JSON")


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _config(args: argparse.Namespace) -> Any:
    from xshare.models.config import ROUTERS

    base = ROUTERS[args.router]()
    over: dict[str, Any] = {}
    for item in args.set:
        if "=" not in item:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        over[k.strip()] = _parse_value(v.strip())
    if "tasks" in over and isinstance(over["tasks"], str):
        over["tasks"] = [t for t in over["tasks"].split(",") if t]
    return base.replace(**over) if over else base


def _model_dir(args: argparse.Namespace, cfg: Any) -> Path:
    from xshare.models.cache import default_model_dir

    return Path(args.model_dir) if args.model_dir else default_model_dir(cfg)


def _selectors(args: argparse.Namespace) -> list[tuple[str, Any]]:
    from xshare.selection import SelectorConfig, available_policies, get_policy
    from xshare.selection.registry import validated
    from xshare.selection.schema import parse_count

    policies = args.policy or ["off", "xshare"]
    budgets = args.budget or ["0.5"]
    known = set(available_policies())
    out: list[tuple[str, Any]] = []
    for pol in policies:
        if pol == "off":
            out.append(("off", None))
            continue
        if pol not in known:
            raise ValueError(f"--policy {pol!r}: unknown; known: off, {', '.join(sorted(known))}")
        policy = get_policy(pol)
        if policy.sweep_knob is None:
            out.append((pol, validated(SelectorConfig(pol))))
            continue
        if policy.sweep_knob == "warmup_k":  # these read the warm-up k0 instead of a budget
            for k0 in args.oea_k0 or [1, 2]:
                out.append((f"{pol}:k0={k0}", validated(SelectorConfig(pol, warmup_k=k0))))
            continue
        for b in budgets:
            cfg = SelectorConfig(pol, budget=parse_count(b, "--budget"), warmup_k=args.warmup_k)
            out.append((f"{pol}@{b}", validated(cfg)))
    return out


def _write_json(path: str | None, data: Any) -> None:
    if path:
        from xshare._io import write_json_atomic

        write_json_atomic(path, data)


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except (ValueError, FileNotFoundError, FileExistsError) as exc:
        print(f"xshare train-tiny: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    from xshare.models import tasks as T
    from xshare.models.cache import check_reproducible, ensure_model
    from xshare.models.config import config_from_dict
    from xshare.models.evaluation import evaluate, task_specialisation
    from xshare.models.experts import SORTED_EXPERTS
    from xshare.models.profiling import profile_decode
    from xshare.models.store import load, model_intact, read_manifest

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.problems < 1:
        raise ValueError(f"--problems must be >= 1, got {args.problems}")
    cfg = _config(args)
    model_dir = _model_dir(args, cfg)
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731

    if args.check:
        res = check_reproducible(model_dir, log=log)
        print(json.dumps(res, indent=2))
        if not res["match"] and not res["same_platform"]:
            log("the platform (torch build / CPU instruction set) differs from the manifest's: "
                "bit-for-bit equality is only promised on the same platform")
        return 0 if res["match"] else 1

    if args.eval or args.profile:
        selectors = _selectors(args) if args.eval else []
        if not model_intact(model_dir):
            raise FileNotFoundError(f"{model_dir}: no intact trained model (run 'xshare train-tiny' first)")
        model, tok = load(model_dir)
        problems = T.heldout(args.problems, seed=args.seed, tasks=config_from_dict(
            read_manifest(model_dir)["config"]).tasks)
        if args.profile:
            import torch

            threads = torch.get_num_threads()
            out: dict[str, Any] = {"model_dir": str(model_dir), "threads": threads}
            for impl in ("eager", SORTED_EXPERTS):
                out[impl] = profile_decode(model, tok, problems[:args.batch_size], experts_impl=impl)
                log(f"{impl}: step {out[impl]['step_ms']:.2f} ms, MoE {out[impl]['moe_ms']:.2f} ms "
                    f"({100 * out[impl]['moe_share']:.0f} %)")
            print(json.dumps(out, indent=2))
            _write_json(args.json, out)
            return 0
        results = []
        for name, sel in selectors:
            ev = evaluate(model, tok, problems, selector=sel, batch_size=args.batch_size,
                          select_prefill=args.select_prefill)
            ev["name"] = name
            spec = task_specialisation(ev.pop("usage_decode"))
            if sel is None:
                ev["specialisation"] = spec
            results.append(ev)
            acc = ev["accuracy"]
            log(f"{name:>14}: exact match {acc['overall']:.3f} ("
                + ", ".join(f"{k} {v:.2f}" for k, v in acc.items() if k != "overall")
                + f"); activated/layer {ev['decode'].get('activated', float('nan')):.2f} "
                f"(top-k on the same rows {ev['decode'].get('vanilla', float('nan')):.2f}); "
                f"decode {ev['decode_tokens_per_s'] or 0:.0f} tok/s")
        doc = {"model_dir": str(model_dir), "problems": args.problems, "seed": args.seed,
               "batch_size": args.batch_size, "results": results}
        _write_json(args.json, doc)
        if not args.json:
            print(json.dumps(doc, indent=2))
        return 0

    if args.force and model_dir.exists():
        man = read_manifest(model_dir)
        if man is None and any(model_dir.iterdir()):
            raise FileExistsError(f"{model_dir} is not empty and holds no tiny-model manifest; refusing to replace it")
        import shutil

        shutil.rmtree(model_dir)
    d = ensure_model(model_dir, cfg, log=log)
    man = read_manifest(d)
    print(json.dumps({"model_dir": str(d), **{k: man[k] for k in
                     ("identity", "parameters", "state_sha256", "weights_sha256", "train_seconds", "final_loss")},
                      "heldout": man.get("heldout")}, indent=2))
    return 0
