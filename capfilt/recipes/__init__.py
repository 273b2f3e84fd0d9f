"""The use cases on top of the core, the pipeline and the trainer: the demo models, the experiment, the loop report, the
shapes-world evaluation."""
