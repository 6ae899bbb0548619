"""fused_rnn.RNN: torch.nn.RNN's interface on the fused kernels, and convert()."""

from __future__ import annotations

from typing import Any, Optional, Tuple, Union, overload

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.rnn import PackedSequence

from . import functional


def _dtype_name(dtype: torch.dtype) -> str:
    """ATen's name of a dtype ("Float", "Double", ...), as nn.RNN's C++ errors print it."""
    return torch.empty(0, dtype=dtype).type().rsplit(".", 1)[-1][: -len("Tensor")]


def _autocast_inputs(dtype: torch.dtype, data: Tensor, hx: Tensor, weights: list):
    def cast(t: Tensor) -> Tensor:
        return t.to(dtype) if t.dtype == torch.float32 else t

    return cast(data), cast(hx), [cast(w) for w in weights]


class RNN(nn.RNNBase):
    r"""A drop-in replacement for :class:`torch.nn.RNN` backed by fused kernels.

    Same constructor, parameters, ``state_dict`` keys, initialisation (same random draws), inputs,
    outputs, gradients and errors as ``torch.nn.RNN``: see its documentation. The difference is
    speed, and that ``torch.compile(fullgraph=True)`` can trace it.

    It derives from ``torch.nn.RNNBase`` (parameter bookkeeping, ``all_weights``,
    ``flatten_parameters``, pickling) but deliberately not from ``torch.nn.RNN``: dynamo refuses to
    trace any ``torch.nn.RNN`` instance. Weights are read from the module's attributes at every call,
    so ``torch.func.functional_call``, parametrizations and reassigned parameters work.

    Example::

        >>> rnn = fused_rnn.RNN(10, 20, num_layers=2, batch_first=True)
        >>> output, h_n = rnn(torch.randn(3, 5, 10))
    """

    @overload
    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1,
                 nonlinearity: str = "tanh", bias: bool = True, batch_first: bool = False,
                 dropout: float = 0.0, bidirectional: bool = False, device: Any = None,
                 dtype: Any = None) -> None: ...

    @overload
    def __init__(self, *args: Any, **kwargs: Any) -> None: ...

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # nn.RNN's argument handling: nonlinearity is the 4th positional argument.
        if "proj_size" in kwargs:
            raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
        if len(args) > 3:
            self.nonlinearity = args[3]
            args = args[:3] + args[4:]
        else:
            self.nonlinearity = kwargs.pop("nonlinearity", "tanh")
        if self.nonlinearity == "tanh":
            mode = "RNN_TANH"
        elif self.nonlinearity == "relu":
            mode = "RNN_RELU"
        else:
            raise ValueError(
                f"Unknown nonlinearity '{self.nonlinearity}'. Select from 'tanh' or 'relu'."
            )
        super().__init__(mode, *args, **kwargs)

    def _current_weights(self) -> list:
        """The weights as one flat list (layer by layer, direction by direction), read now from the
        module's attributes."""
        if torch.compiler.is_compiling():
            return [getattr(self, name) for name in self._flat_weights_names]
        # nn.RNN's own refresh, so that weights computed on access (parametrizations such as
        # spectral_norm, whose power iteration runs on every access in training) are read exactly
        # as often, and give exactly the values, that nn.RNN would use.
        self._update_flat_weights()
        return self._flat_weights

    def _check_forward_args(self, input: Tensor, hx: Tensor, weight_dtype: torch.dtype,
                            batch_sizes: Optional[Tensor]) -> None:
        if input.dtype != weight_dtype and not torch._C._is_any_autocast_enabled():
            if not torch.compiler.is_compiling():
                # nn.RNN's own check, whose message differs between torch versions.
                nn.RNNBase.check_input(self, input, batch_sizes)
            raise ValueError(
                f"RNN input dtype ({input.dtype}) does not match weight dtype ({weight_dtype}). "
                f"Convert input: input.to({weight_dtype}), or convert model: model.to({input.dtype})"
            )
        expected_dim = 2 if batch_sizes is not None else 3
        if input.dim() != expected_dim:
            raise RuntimeError(f"input must have {expected_dim} dimensions, got {input.dim()}")
        if self.input_size != input.size(-1):
            raise RuntimeError(
                f"input.size(-1) must be equal to input_size. Expected {self.input_size}, "
                f"got {input.size(-1)}"
            )
        # nn.RNNBase.check_hidden_size(get_expected_hidden_size(...)), written out: dynamo before
        # torch 2.5 does not inline methods of torch.nn classes.
        if batch_sizes is not None:
            mini_batch = int(batch_sizes[0])
        else:
            mini_batch = input.size(0) if self.batch_first else input.size(1)
        expected = ((2 if self.bidirectional else 1) * self.num_layers, mini_batch, self.hidden_size)
        if hx.size() != expected:
            raise RuntimeError(f"Expected hidden size {expected}, got {list(hx.size())}")
        if hx.device != input.device:
            raise RuntimeError(
                "Input and hidden tensors are not at the same device, found input tensor at "
                f"{input.device} and hidden tensor at {hx.device}"
            )
        if batch_sizes is None and input.size(0) == 0:
            raise RuntimeError("Expected sequence length to be larger than 0 in RNN")
        if hx.dtype != weight_dtype and not torch._C._is_any_autocast_enabled():
            raise RuntimeError(
                "mat1 and mat2 must have the same dtype, but got "
                f"{_dtype_name(hx.dtype)} and {_dtype_name(weight_dtype)}"
            )

    @overload
    def forward(self, input: Tensor, hx: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]: ...

    @overload
    def forward(self, input: PackedSequence,
                hx: Optional[Tensor] = None) -> Tuple[PackedSequence, Tensor]: ...

    def forward(self, input: Union[Tensor, PackedSequence],
                hx: Optional[Tensor] = None) -> Tuple[Union[Tensor, PackedSequence], Tensor]:
        """Runs the RNN: ``(output, h_n)`` exactly as :meth:`torch.nn.RNN.forward`."""
        num_directions = 2 if self.bidirectional else 1
        weights = self._current_weights()
        weight_dtype = weights[0].dtype
        is_packed = isinstance(input, PackedSequence)
        is_batched = True
        batch_dim = 0 if self.batch_first else 1
        if is_packed:
            data, batch_sizes, sorted_indices, unsorted_indices = input
            max_batch_size = int(batch_sizes[0])
        else:
            data, batch_sizes, sorted_indices, unsorted_indices = input, None, None, None
            if data.dim() not in (2, 3):
                raise ValueError(
                    f"RNN: Expected input to be 2D or 3D, got {data.dim()}D tensor instead"
                )
            is_batched = data.dim() == 3
            if not is_batched:
                data = data.unsqueeze(batch_dim)
                if hx is not None:
                    if hx.dim() != 2:
                        raise RuntimeError(
                            "For unbatched 2-D input, hx should also be 2-D but got "
                            f"{hx.dim()}-D tensor"
                        )
                    hx = hx.unsqueeze(1)
            elif hx is not None and hx.dim() != 3:
                raise RuntimeError(
                    f"For batched 3-D input, hx should also be 3-D but got {hx.dim()}-D tensor"
                )
            max_batch_size = data.size(0) if self.batch_first else data.size(1)
        if hx is None:
            hx = torch.zeros(self.num_layers * num_directions, max_batch_size, self.hidden_size,
                             dtype=data.dtype, device=data.device)
        elif sorted_indices is not None:
            hx = hx.index_select(1, sorted_indices)
        self._check_forward_args(data, hx, weight_dtype, batch_sizes)

        device_type = data.device.type
        autocast = torch.is_autocast_enabled(device_type)
        if not is_packed and self.batch_first:
            data = data.transpose(0, 1)
        args = (batch_sizes, self.mode == "RNN_RELU", self.bias, self.num_layers, self.dropout,
                self.training, self.bidirectional)
        if autocast:
            # nn.RNN's autocast policy (rnn_tanh/rnn_relu are lower-precision ops): float32
            # input, hidden state and weights run in the autocast dtype; others stay as they are.
            data, hx, weights = _autocast_inputs(torch.get_autocast_dtype(device_type), data, hx,
                                                 weights)
            if hx.dtype != weights[0].dtype:
                raise RuntimeError(
                    "mat1 and mat2 must have the same dtype, but got "
                    f"{_dtype_name(hx.dtype)} and {_dtype_name(weights[0].dtype)}"
                )
            with torch.autocast(device_type, enabled=False):
                output, h_n = functional._rnn_flat(data, hx, weights, *args)
        else:
            output, h_n = functional._rnn_flat(data, hx, weights, *args)
        if unsorted_indices is not None:
            h_n = h_n.index_select(1, unsorted_indices)
        if is_packed:
            return PackedSequence(output, batch_sizes, sorted_indices, unsorted_indices), h_n
        if self.batch_first:
            output = output.transpose(0, 1)
        if not is_batched:
            output = output.squeeze(batch_dim)
            h_n = h_n.squeeze(1)
        return output, h_n


def _fused_from(rnn: nn.RNN) -> RNN:
    """A fused_rnn.RNN holding the very same Parameter objects (and hooks, mode, flags) as rnn."""
    fused = RNN.__new__(RNN)
    fused.__dict__.update(rnn.__dict__)
    for attr in ("_parameters", "_buffers", "_modules", "_flat_weights", "_flat_weights_names"):
        value = getattr(rnn, attr)
        fused.__dict__[attr] = value.copy()
    if parametrize.is_parametrized(rnn):
        # Parametrized modules live in a generated subclass whose properties compute the weights;
        # give the fused module the same properties on a subclass of RNN.
        props = {k: v for k, v in type(rnn).__dict__.items() if isinstance(v, property)}
        fused.__class__ = type(f"Parametrized{RNN.__name__}", (RNN,), props)
    return fused


def _is_plain_nn_rnn(module: nn.Module) -> bool:
    cls = type(module)
    if parametrize.is_parametrized(module):
        cls = cls.__bases__[0]
    return cls is nn.RNN


def convert(module: nn.Module) -> nn.Module:
    """Replace every ``torch.nn.RNN`` inside ``module`` by a :class:`fused_rnn.RNN`, in place.

    The replacements share (not copy) the original parameters, so optimizers, tied weights and
    parametrizations keep working. Subclasses of ``nn.RNN`` (which may override ``forward``) are left
    alone. Returns ``module``, or its replacement when ``module`` itself is an ``nn.RNN``.

    Example::

        >>> model = fused_rnn.convert(model)
    """
    if _is_plain_nn_rnn(module):
        return _fused_from(module)  # type: ignore[arg-type]
    for name, child in module.named_children():
        replaced = convert(child)
        if replaced is not child:
            setattr(module, name, replaced)
    return module
