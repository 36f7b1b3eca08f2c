"""``mm demo``: the whole recipe in miniature on generated data, offline, on a CPU.

:mod:`mm.demo.run` runs the phases in order (:func:`mm.demo.run.run_demo`), one module each:
:mod:`~mm.demo.text` (the frozen text model), :mod:`~mm.demo.image`, :mod:`~mm.demo.video` and
:mod:`~mm.demo.speech`; :mod:`~mm.demo.eval_sets` writes their held-out sets in published
layouts and scores them through ``mm eval``, :mod:`~mm.demo.evaluate` measures the text model's
perplexity and :mod:`~mm.demo.report` is what a run writes. The generated data is :mod:`mm.demo.data`'s.
"""

__all__: list[str] = []
