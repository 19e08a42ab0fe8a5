"""`export`: a training checkpoint -> a plain Hugging Face model folder (safetensors + tokenizer).

Under DeepSpeed the fp32 weights are spread over the ranks' optimizer shards; DeepSpeed's zero_to_fp32 joins
them offline, in one process, whatever number of processes wrote them. It unpickles those shards
(torch.load(weights_only=False), DeepSpeed's choice): export only checkpoints you trust.
"""

from __future__ import annotations

HELP = "export a checkpoint as a Hugging Face model folder (safetensors + tokenizer) for from_pretrained"


def add_arguments(parser) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="PATH",
                        help="a checkpoint folder (RUN/checkpoints/step_*), the RUN/checkpoints/latest file, or a run "
                             "folder (its newest complete checkpoint)")
    parser.add_argument("--output", required=True, metavar="DIR", help="folder to write the model and tokenizer to")
    parser.add_argument("--tokenizer_dir", default="", metavar="DIR",
                        help="tokenizer folder (default: the tokenizer_dir saved in the checkpoint's config)")
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it holds an earlier export")
    parser.add_argument("--adapter_only", action="store_true",
                        help="a LoRA run: write its adapters alone (peft's folder: PeftModel.from_pretrained(base, DIR)) "
                             "instead of merging them into the base model")


def run(args, cfg) -> int:
    import logging
    from pathlib import Path

    from lowmem_train.trainer.export import export_checkpoint

    done = export_checkpoint(Path(args.checkpoint), Path(args.output), args.tokenizer_dir, args.overwrite,
                             args.adapter_only)
    logging.getLogger(__name__).info(
        "exported %s (%s, %.2f M parameters, step %d, %s) to %s; try: lowmem-train generate --model %s --prompt 12345",
        done.point.path, done.model_type, done.parameters / 1e6, done.point.state.step, done.weights, done.output,
        done.output)
    return 0
