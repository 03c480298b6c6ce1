"""The application: the CLI, the config file, the workflows it runs (fit/test/predict/tune), reports."""
