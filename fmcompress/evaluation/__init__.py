"""The evaluation harness: data and models that judge the compiler, apart from it.

The compiler never imports this package; tests, examples and benchmarks do.

* `textlines`: text lines rendered with labels known by construction, fed to PP-OCR's
  direction classifier and recognizer as rapidocr feeds them, and scored;
* `otherlines`: a second, independent set of text lines (other fonts, texts, lengths,
  backgrounds, noise), so an accuracy figure tuned on one set is confirmed on the other;
* `thirdparty`: the real third-party ONNX models that installed PyPI wheels ship.

The named datasets of `compile --data` (`fmcompress.datasets`) and the box matching of
the detector fidelity report (`fmcompress.detection`) stay in the library: the compiler
uses them.
"""
