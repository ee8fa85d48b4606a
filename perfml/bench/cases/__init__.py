"""Built-in benchmark cases, one file per op; importing this package registers them all."""

from perfml.bench.cases import (
    adamw,  # noqa: F401
    add_rms_norm,  # noqa: F401
    cross_entropy,  # noqa: F401
    hf_train_step,  # noqa: F401
    layer_norm,  # noqa: F401
    linear_cross_entropy,  # noqa: F401
    llama_decode,  # noqa: F401
    quant_matmul,  # noqa: F401
    rms_norm,  # noqa: F401
    rope,  # noqa: F401
    softmax,  # noqa: F401
    sparse24_linear,  # noqa: F401
    swiglu,  # noqa: F401
    train_step,  # noqa: F401
)
