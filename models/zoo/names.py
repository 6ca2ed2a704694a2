"""Model names the CLI, specs and `build_model` accept."""

IMAGE_MODELS = ("mlp", "lenet5", "resnet20", "resnet32", "resnet56")
REC_MODELS = ("dlrm",)
MODELS = IMAGE_MODELS + REC_MODELS
