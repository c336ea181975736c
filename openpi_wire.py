"""openpi's wire format (its msgpack_numpy), and a client of its websocket policy protocol: what serve.py speaks and
what libero_eval.py --server uses. numpy, msgpack and websockets only.

A message is msgpack. A numpy array travels as the map
    {b"__ndarray__": True, b"data": its bytes (C order), b"dtype": dtype.str (e.g. "<f4", "|u1"), b"shape": [dims]}
and a numpy scalar as {b"__npgeneric__": True, b"data": its value, b"dtype": dtype.str}; strings, numbers, lists and
dicts are msgpack's own. Only numeric and boolean dtypes are accepted on arrival: an object array built from a
stranger's bytes would hold pointers.

Not here: the server (serve.py).
"""
import contextlib
import math

import msgpack
import numpy as np
import websockets.sync.client

_KINDS = "biuf"     # bool, int, unsigned, float


def _encode(obj):
    if isinstance(obj, np.ndarray) and obj.dtype.kind in _KINDS:
        return {b"__ndarray__": True, b"data": obj.tobytes(), b"dtype": obj.dtype.str, b"shape": list(obj.shape)}
    if isinstance(obj, np.generic) and obj.dtype.kind in _KINDS:
        return {b"__npgeneric__": True, b"data": obj.item(), b"dtype": obj.dtype.str}
    raise TypeError(f"cannot send {type(obj).__name__} {getattr(obj, 'dtype', '')}: only numbers, strings, lists, "
                    f"dicts and numeric numpy arrays")


def _decode(d):
    if b"__ndarray__" in d or b"__npgeneric__" in d:
        dtype = np.dtype(d[b"dtype"])
        if dtype.kind not in _KINDS:
            raise ValueError(f"arrays of dtype {dtype} are not accepted, only numeric ones")
        if b"__npgeneric__" in d:
            return dtype.type(d[b"data"])
        shape = tuple(d[b"shape"])
        size = dtype.itemsize * math.prod(shape)
        if len(d[b"data"]) != size or min(shape, default=0) < 0:
            raise ValueError(f"an array of shape {shape} and dtype {dtype} needs {size} bytes, the message holds "
                             f"{len(d[b'data'])}")
        return np.frombuffer(d[b"data"], dtype=dtype).reshape(shape)
    return d


def pack(obj):
    return msgpack.packb(obj, default=_encode)


def unpack(message):
    """A message's object; raises (msgpack's or numpy's exceptions, ValueError) on anything malformed."""
    return msgpack.unpackb(message, object_hook=_decode)


class ServerError(RuntimeError):
    """The server answered a request with an error message."""


class Client:
    """One connection to a policy server, as openpi_client.WebsocketClientPolicy makes it, plus reset().
    infer(obs) -> the answer dict; send(obs) and receive() split it, to have several clients' requests in flight."""

    def __init__(self, address, open_timeout=30):
        uri = address if address.startswith("ws") else f"ws://{address}"
        self._stack = contextlib.ExitStack()      # connect() is a context manager (websockets >= 17 insists)
        self.ws = self._stack.enter_context(websockets.sync.client.connect(uri, compression=None, max_size=None,
                                                                           open_timeout=open_timeout))
        self.metadata = unpack(self.ws.recv())

    def send(self, obs):
        self.ws.send(pack(obs))

    def receive(self):
        reply = self.ws.recv()
        if isinstance(reply, str):
            raise ServerError(reply)
        return unpack(reply)

    def infer(self, obs):
        self.send(obs)
        return self.receive()

    def reset(self):
        """A new episode: the server forgets this connection's frame history."""
        ack = self.infer({"__ctrl__": "episode_start"})
        if ack != {"__ack__": "episode_start"}:
            raise ServerError(f"the server answered episode_start with {ack!r}")

    def close(self):
        self._stack.close()
