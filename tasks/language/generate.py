"""Print a model's greedy continuation of a prompt: a quick check that a model loads and speaks.

    python -m tasks.language.generate --prompt "Once upon a time" --max-new-tokens 60
    python -m tasks.language.generate --model stories260k-mistral
    python -m tasks.language.generate --model meta-llama/Llama-2-7b-hf --revision <commit>
"""

from __future__ import annotations

import argparse

from tasks.language.models import from_hub, greedy_continuation, stories260k


def load(model: str, revision: str | None = None, dtype: str | None = None):
    """(model, tokenizer) by short name: the offline stories260K in either architecture, else a hub id."""
    if model == "stories260k":
        return stories260k(architecture="llama", dtype=dtype or "float32")
    if model == "stories260k-mistral":
        return stories260k(architecture="mistral", dtype=dtype or "float32")
    return from_hub(model, revision=revision, dtype=dtype or "bfloat16")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt", default="Once upon a time")
    parser.add_argument("--max-new-tokens", type=int, default=60)
    parser.add_argument("--model", default="stories260k", help="stories260k, stories260k-mistral, or a hub id")
    parser.add_argument("--revision", default=None, help="hub commit to pin (hub ids only)")
    parser.add_argument("--dtype", default=None, help="float32 for stories260k, bfloat16 for hub models by default")
    args = parser.parse_args(argv)

    model, tokenizer = load(args.model, args.revision, args.dtype)
    print(greedy_continuation(model, tokenizer, args.prompt, args.max_new_tokens))


if __name__ == "__main__":
    main()
