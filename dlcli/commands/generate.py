"""`dlcli generate RUN_DIR --prompt TEXT`: sample text from a language-model run (dlcli.generation), streaming the
tokens to stdout as they come."""
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from dlcli.commands.base import AllowConfigChangeOption, app, console, handles_errors


@app.command()
@handles_errors
def generate(
    run_dir: Annotated[Path, typer.Argument(help="A language-model run, e.g. one of configs/imdb_gpt.yaml.")],
    prompt: Annotated[str, typer.Option(help="The text to continue (encoded with the run's tokenizer; it starts a "
                                             "review).")],
    length: Annotated[int, typer.Option(min=1, help="Tokens to generate per sample (fewer if the model ends the "
                                                    "review).")] = 100,
    temperature: Annotated[float, typer.Option(help="Divides the log-probabilities: below 1 sharper, above 1 "
                                                    "flatter; must be positive.")] = 0.8,
    top_k: Annotated[int, typer.Option("--top-k", help="Sample among the k likeliest tokens (0: all).")] = 40,
    top_p: Annotated[float, typer.Option("--top-p", help="Then among the fewest tokens whose probability reaches "
                                                         "p (nucleus sampling; 1: all).")] = 0.95,
    samples: Annotated[int, typer.Option(min=1, help="Independent continuations, one after another.")] = 3,
    seed: Annotated[Optional[int], typer.Option(help="Seed of the sampling: the same seed, run and options give "
                                                     "the same text.")] = None,
    weights: Annotated[str, typer.Option(help="best or last.")] = "best",
    allow_config_change: AllowConfigChangeOption = False,
):
    """Generate text from a language model, with a key/value cache (each new token costs one position's work).

    Example: dlcli generate runs/imdb-gpt-20261206-101500 --prompt "this movie was" --length 60 --seed 0
    """
    import numpy as np

    from dlcli.errors import DlcliError
    from dlcli.generation import Sampling, load_language_model

    sampling = Sampling(temperature, top_k, top_p)
    sampling.check()
    if not prompt.strip():
        raise DlcliError("--prompt is empty: give the text to continue, e.g. --prompt \"this movie was\"", exit_code=2)
    decoder, codec = load_language_model(run_dir, weights, allow_config_change)
    from dlcli.engine import blas

    rng = np.random.default_rng(seed)
    ids = codec.encode([prompt])[0]
    out, info = sys.stdout, console(stderr=True)
    produced, started = 0, time.perf_counter()
    with blas.one_thread():  # one sequence's products are too small to split: a second thread only costs
        produced = _stream(decoder, codec, prompt, ids, length, rng, sampling, samples, out, info)
    seconds = time.perf_counter() - started
    info.print(f"{produced} tokens in {seconds:.2f} s ({produced / seconds:.1f} tokens/s, prompt of {len(ids)} "
               f"tokens, context {decoder.context})", markup=False)


def _stream(decoder, codec, prompt, ids, length, rng, sampling, samples, out, info) -> int:
    """Print each sample as its tokens are drawn; the number of tokens drawn."""
    from dlcli.data.language import START
    from dlcli.generation import generate as sample_tokens

    produced = 0
    for i in range(samples):
        info.print(f"--- sample {i + 1} of {samples}", markup=False)
        out.write(prompt)
        shown, new = "", []
        for token in sample_tokens(decoder, ids, length, rng, sampling, stop=START):
            new.append(token)
            produced += 1
            text = codec.decode(new) if codec.kind == "bpe" else " " + codec.decode(new)  # BPE tokens hold spaces
            if text.endswith("\ufffd"):
                continue  # part of a multi-byte character: wait for the rest
            out.write(text[len(shown):])
            out.flush()
            shown = text
        out.write("\n")
        out.flush()
    return produced
