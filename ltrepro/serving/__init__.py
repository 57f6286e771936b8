"""Serving: the pyfunc model MLflow loads (``onnx_pyfunc``), a local ``mlflow models serve``
process (``server``) and the HTTP load test (``loadtest``)."""
