"""Tiny notebooks for the workbook's and the sweeps' own tests (one builder for both)."""


def write_notebook(path, params_src: str, *cells: str):
    """A notebook for the workbook's own tests: a ``parameters`` cell, then code cells, on the lab's kernel."""
    import nbformat

    from pruning_lab import workbook

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": workbook.KERNEL_NAME, "display_name": "x", "language": "python"}
    p = nbformat.v4.new_code_cell(params_src)
    p.metadata["tags"] = ["parameters"]
    nb.cells = [p, *(nbformat.v4.new_code_cell(c) for c in cells)]
    nbformat.write(nb, path)
    return path
