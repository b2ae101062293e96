"""charlm: train, watch and sample character-level language models. `charlm.fit(flags)` trains from Python,
`charlm.load(folder)` loads an exported model."""


def __getattr__(name: str):
    # imported on first use: `import charlm` (and `charlm --help`) stays free of torch and Lightning
    if name == "fit":
        from charlm.cli import fit

        return fit
    if name == "load":  # (net, tokenizer) from a folder `charlm export` wrote, or a checkpoint
        from charlm.checkpoints import load_net

        return load_net
    raise AttributeError(f"module 'charlm' has no attribute {name!r}")
