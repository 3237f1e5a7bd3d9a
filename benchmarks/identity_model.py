"""The serving benchmark's ceiling: a pyfunc that returns its input (logged as models-from-code, no pickle)."""

import mlflow


class Identity(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input, params=None):
        return model_input


mlflow.models.set_model(Identity())
