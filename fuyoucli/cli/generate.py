"""`fuyou generate SOURCE --prompt TEXT`: stream a completion from a run's model, a checkpoint, an exported
folder or any model. Thin: one call to fuyoucli.generate; tokens go to stdout, the header and the
summary to stderr."""

from __future__ import annotations

import sys

import typer


def generate(
    source: str = typer.Argument(..., metavar="RUN_OR_MODEL_OR_CHECKPOINT",
                                 help="A run's OUTPUT_DIR (its final model, else its newest checkpoint), "
                                      "OUTPUT_DIR/model, a checkpoint folder, a `fuyou export` folder (full or "
                                      "LoRA adapter), or a model as model.path names one (folder, .gguf, pkg:, "
                                      "hub id org/name)."),
    prompt: str = typer.Option(..., "--prompt", "-p", help="The text to continue (with --chat: the user's message)."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", min=1, help="Tokens to generate at most."),
    chat: bool = typer.Option(False, "--chat", help="Wrap the prompt as a user turn with the model's chat "
                                                    "template and answer as the assistant."),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0,
                                      help="0: greedy (the same text every time). > 0: sample at this temperature."),
    seed: int = typer.Option(0, "--seed", help="Seed of the sampling (with --temperature > 0)."),
    device: str = typer.Option("auto", "--device", metavar="auto|cpu",
                               help="auto: the GPU when there is one, else the CPU. cpu: the CPU."),
    stream: bool = typer.Option(False, "--stream",
                                help="For a model larger than the device: stream the decoder layers from host "
                                     "memory through the offload engine, as training does (planned like a "
                                     "recipe with offload.mode: stream). No KV cache: every new token runs the "
                                     "whole sequence through every layer again, so it is slow."),
) -> None:
    """Generate text from a fine-tuned model, streaming tokens to the terminal."""
    if device not in ("auto", "cpu"):
        raise typer.BadParameter(f"{device!r}: the devices are auto and cpu", param_hint="--device")
    import warnings

    # Deprecation notices of the libraries' internals are not the user's business here: stderr carries
    # fuyou's header and summary, stdout only the generated text.
    warnings.filterwarnings("ignore", category=FutureWarning)
    from fuyoucli.engine.lanes import compute_device
    from fuyoucli.generate import generate as run_generate
    from fuyoucli.generate import load_for_generation

    loaded = load_for_generation(source)
    where = compute_device() if device == "auto" else "cpu"
    how = " (layers streamed through the offload engine, no KV cache: slow)" if stream else ""
    print(f"fuyou: generating from {loaded.what} on {where}{how}", file=sys.stderr)

    def note(line: str) -> None:
        print(f"fuyou: {line}", file=sys.stderr)

    try:
        tokens, seconds = run_generate(loaded, prompt, max_new_tokens=max_new_tokens, chat=chat,
                                       temperature=temperature, seed=seed, device=where, stream_layers=stream,
                                       note=note)
    except RuntimeError as e:  # torch's OutOfMemoryError is a RuntimeError too
        if "out of memory" not in str(e).lower():
            raise
        from fuyoucli.errors import ResourceError

        raise ResourceError(f"{loaded.what} does not fit on {where} for generation: --stream streams its layers "
                            "through the offload engine (slow), --device cpu generates on the CPU") from e
    rate = f", {tokens / seconds:.1f} tokens/s" if seconds > 0 else ""
    print(f"fuyou: {tokens} tokens in {seconds:.2f} s{rate}", file=sys.stderr)
