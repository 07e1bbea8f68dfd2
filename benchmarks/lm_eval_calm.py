"""Run lm-evaluation-harness `generate_until` tasks on a CALM, through lm-eval's own Hugging Face model (HFLM).

A CALM predicts vectors, not token distributions: it has no token likelihoods, so lm-eval's `loglikelihood`,
`loglikelihood_rolling` and `multiple_choice` tasks cannot run on it. Generation tasks run unchanged, exactly as

    lm_eval --model hf --model_args pretrained=FOLDER,trust_remote_code=True --tasks TASKS

would run them; this script does the same in Python and refuses other task types up front with a clear error.
The context length reaches lm-eval through the tokenizer's `model_max_length`, which the project's tools set when
they save a model folder (`modeling_calm.data_calm.save_tokenizer_with_model`).

    pip install lm-eval
    python benchmarks/lm_eval_calm.py --model runs/calm --tasks gsm8k --limit 100 --output gsm8k.json
    python benchmarks/lm_eval_calm.py --model runs/calm --tasks my_task --include_path my_tasks/  # local YAML tasks
"""

from __future__ import annotations

import argparse
import json
import sys


NO_LIKELIHOODS = "CALM has no token likelihoods: only generate_until tasks can run"


def _leaf_tasks(task_dict) -> dict:
    """lm-eval's nested {group: {task: Task}} -> {task name: Task}."""
    leaves = {}
    for name, value in task_dict.items():
        if isinstance(value, dict):
            leaves.update(_leaf_tasks(value))
        elif value is not None:
            leaves[getattr(name, "group_name", name)] = value
    return leaves


def check_generation_tasks(tasks: list[str], task_manager) -> None:
    """Raises `ValueError` naming the first task whose requests are not `generate_until`."""
    from lm_eval.tasks import get_task_dict

    for name, task in _leaf_tasks(get_task_dict(tasks, task_manager)).items():
        output_type = getattr(task, "OUTPUT_TYPE", None) or task.config.output_type
        if output_type != "generate_until":
            raise ValueError(f"{NO_LIKELIHOODS} (task {name!r} is a {output_type!r} task).")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="CALM folder or Hub id (loaded with trust_remote_code).")
    parser.add_argument("--tasks", required=True, help="Comma-separated lm-eval task names.")
    parser.add_argument("--include_path", default=None, help="Folder of extra (local) task YAML files.")
    parser.add_argument("--limit", type=float, default=None, help="Documents per task (or a fraction).")
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--device", default=None, help="e.g. cuda:0 (default: lm-eval's choice).")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--seed", type=int, default=0, help="Seed of lm-eval's python/numpy/torch generators.")
    parser.add_argument("--output", default=None, help="Write the results (JSON) here.")
    args = parser.parse_args(argv)
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise SystemExit(f"This script needs lm-evaluation-harness: pip install lm-eval ({err}).")

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    task_manager = TaskManager(include_path=args.include_path)
    check_generation_tasks(tasks, task_manager)
    results = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={args.model},trust_remote_code=True,dtype={args.dtype}",
        tasks=tasks,
        task_manager=task_manager,
        limit=args.limit,
        batch_size=args.batch_size,
        device=args.device,
        random_seed=args.seed,
        numpy_random_seed=args.seed,
        torch_random_seed=args.seed,
        log_samples=False,
    )
    report = {"model": args.model, "tasks": tasks, "results": results["results"]}
    text = json.dumps(report, indent=2, default=str)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    print(text)
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
