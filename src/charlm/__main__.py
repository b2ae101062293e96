"""`python -m charlm COMMAND`: the command table, the usage, and the one place where an error or a signal becomes
one line and an exit code. The commands import torch and Lightning; `charlm --help` answers without them."""

import importlib
import json
import os
import signal
import sys

# name -> (module, function, what it does): fit, validate and test are LightningCLI's (charlm.cli.run), the others
# typed functions whose arguments are their flags and whose docstrings are their --help
COMMANDS = {
    "fit": ("charlm.cli", None, "train a bigram or a GPT: --config, --model.*, --data.*, --trainer.*, --checkpoint.*"),
    "validate": ("charlm.cli", None, "the exact validation loss of a checkpoint"),
    "test": ("charlm.cli", None, "the same, reported as test/loss"),
    "generate": ("charlm.commands", "generate", "stream text from a trained checkpoint to stdout"),
    "attention": ("charlm.commands", "attention", "save a picture of a GPT checkpoint's attention over a text"),
    "export": ("charlm.commands", "export", "write a checkpoint's net as safetensors, config.json and a model card"),
    "data": ("charlm.data", "summary", "a first look at a corpus: its size, alphabet, most frequent characters, split"),
    "serve": ("charlm.serve", "serve", "a playground in the browser: watch text stream in, see what the model weighed"),
    "sweep": ("charlm.sweep", "sweep", "search hyperparameters on Optuna: trials of fit, stopped early when worse"),
}


def usage() -> str:
    lines = [f"usage: charlm {{{','.join(COMMANDS)}}} ...   (or python -m charlm ...)", ""]
    lines += [f"  {name:<10} {about}" for name, (_, _, about) in COMMANDS.items()]
    return "\n".join([*lines, "", "charlm COMMAND --help lists the command's flags."])


def run_function(name: str, function, argv: list[str]) -> None:
    """Parse argv into the function's typed arguments (a class-typed one is built from its flags; a dataclass's
    fields are flags of their own, `--temperature` and not `--sampling.temperature`) and call it."""
    import dataclasses
    import inspect

    from charlm.flags import CommandParser, Help

    description = function.__doc__.split("\n\n")[0]
    parser = CommandParser(prog=f"charlm {name}", description=description, allow_abbrev=False, formatter_class=Help)
    params = inspect.signature(function).parameters.values()
    flat = {p.name: p.annotation for p in params if dataclasses.is_dataclass(p.annotation)}
    parser.add_function_arguments(function, as_group=False, skip=set(flat))
    for cls in flat.values():
        parser.add_class_arguments(cls, nested_key=None)
    kwargs = vars(parser.instantiate(parser.parse_args(argv)))
    for key, cls in flat.items():
        kwargs[key] = cls(**{f.name: kwargs.pop(f.name) for f in dataclasses.fields(cls)})
    function(**kwargs)


def run(argv: list[str]) -> None:
    module, function, _ = COMMANDS[argv[0]]
    if function is None:
        importlib.import_module(module).run(argv)
        return
    if argv[0] == "sweep" and "--" in argv:  # sweep [FLAGS] -- [FIT FLAGS]: the rest is for every trial's fit
        argv = [*argv[: argv.index("--")], "--fit", json.dumps(argv[argv.index("--") + 1 :])]
    run_function(argv[0], getattr(importlib.import_module(module), function), argv[1:])


def one_line_errors() -> tuple[type[Exception], ...]:
    """The errors that are said in one line: charlm's, and Lightning's for a bad --trainer flag where the command
    imported Lightning."""
    module = sys.modules.get("lightning.fabric.utilities.exceptions")
    return (ValueError, OSError, *([module.MisconfigurationException] if module else []))


def main(args: list[str] | None = None) -> None:
    argv = sys.argv[1:] if args is None else list(args)
    if args is None:  # the name that help about a class (--model.net.help GPT) gives the program
        sys.argv[0] = "charlm"
    if argv[:1] in ([], ["-h"], ["--help"]):
        print(usage(), file=sys.stdout if argv else sys.stderr)
        sys.exit(0 if argv else 2)
    if argv[0] not in COMMANDS:
        names = ", ".join(COMMANDS).rsplit(", ", 1)
        sys.exit(f"charlm: error: {argv[0]!r} is not a command: use {' or '.join(names)}")
    from charlm.errors import FlagError, Stopped, first_line, stop_now

    # until a training loop takes them over, a signal stops the command at once (Lightning's own SIGTERM handler
    # calls this one after it; alone, it would end a validation with exit code 0)
    handlers = {signum: signal.signal(signum, stop_now) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        run(argv)
    except Stopped as e:
        detail = f" {e.detail}" if e.detail else ""
        print(f"charlm: {signal.Signals(e.signum).name} received: stopped{detail}", file=sys.stderr)
        sys.exit(128 + e.signum)
    except BrokenPipeError:  # stdout closed early (generate | head): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing left to flush at exit
        sys.exit(141)
    except FlagError as e:
        print(e, file=sys.stderr)
        sys.exit(2)
    except (MemoryError, RuntimeError) as e:  # torch's allocators raise RuntimeErrors, CUDA's a subclass
        message = first_line(e, limit=None)  # searched whole, shown cut
        if not isinstance(e, MemoryError) and "out of memory" not in message and "allocate memory" not in message:
            raise
        sys.exit(
            f"charlm: error: out of memory ({message[:200]}): lower --data.batch_size or --data.block_size, or "
            "train a smaller model"
        )
    except one_line_errors() as e:
        sys.exit(f"charlm: error: {e}")
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)


if __name__ == "__main__":
    main()
