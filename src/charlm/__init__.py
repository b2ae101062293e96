"""charlm: train, watch and sample character-level language models. `charlm.fit(flags)` trains from Python."""


def __getattr__(name: str):
    # imported on first use: `import charlm` (and `charlm --help`) stays free of torch and Lightning
    if name == "fit":
        from charlm.cli import fit

        return fit
    raise AttributeError(f"module 'charlm' has no attribute {name!r}")
