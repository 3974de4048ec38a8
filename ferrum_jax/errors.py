"""`FerrumError`: the one exception type of ferrum-jax, with Ferrum's error kinds."""

from __future__ import annotations

import enum


class ErrorKind(enum.Enum):
    """Kinds of `ferrum_types::FerrumError` (Ferrum 0.6.0), one per Rust constructor."""

    CONFIG = "config"
    MODEL = "model"
    TOKENIZER = "tokenizer"
    BACKEND = "backend"
    DEVICE = "device"
    SCHEDULER = "scheduler"
    REQUEST_VALIDATION = "request_validation"
    RESOURCE_EXHAUSTED = "resource_exhausted"
    TIMEOUT = "timeout"
    IO = "io"
    SERIALIZATION = "serialization"
    INTERNAL = "internal"
    CANCELLED = "cancelled"
    NOT_FOUND = "not_found"
    ALREADY_EXISTS = "already_exists"
    UNSUPPORTED = "unsupported"
    INVALID_FORMAT = "invalid_format"
    INVALID_PARAMETER = "invalid_parameter"


# Transient conditions: the same call may succeed later without changing the request.
# Ferrum 0.6.0 `is_retryable` is ResourceExhausted | Timeout | Network; Network is not ported.
_RETRYABLE = frozenset({ErrorKind.TIMEOUT, ErrorKind.RESOURCE_EXHAUSTED})


class FerrumError(Exception):
    """An error with a Ferrum kind. Build it with the kind-named constructors."""

    def __init__(self, kind: ErrorKind, message: str) -> None:
        super().__init__(f"{kind.value}: {message}")
        self.kind = kind
        self.message = message

    def is_retryable(self) -> bool:
        return self.kind in _RETRYABLE

    @classmethod
    def config(cls, message: str) -> FerrumError:
        return cls(ErrorKind.CONFIG, message)

    @classmethod
    def model(cls, message: str) -> FerrumError:
        return cls(ErrorKind.MODEL, message)

    @classmethod
    def tokenizer(cls, message: str) -> FerrumError:
        return cls(ErrorKind.TOKENIZER, message)

    @classmethod
    def backend(cls, message: str) -> FerrumError:
        return cls(ErrorKind.BACKEND, message)

    @classmethod
    def device(cls, message: str) -> FerrumError:
        return cls(ErrorKind.DEVICE, message)

    @classmethod
    def scheduler(cls, message: str) -> FerrumError:
        return cls(ErrorKind.SCHEDULER, message)

    @classmethod
    def request_validation(cls, message: str) -> FerrumError:
        return cls(ErrorKind.REQUEST_VALIDATION, message)

    @classmethod
    def resource_exhausted(cls, message: str) -> FerrumError:
        return cls(ErrorKind.RESOURCE_EXHAUSTED, message)

    @classmethod
    def timeout(cls, message: str) -> FerrumError:
        return cls(ErrorKind.TIMEOUT, message)

    @classmethod
    def io(cls, message: str) -> FerrumError:
        return cls(ErrorKind.IO, message)

    @classmethod
    def serialization(cls, message: str) -> FerrumError:
        return cls(ErrorKind.SERIALIZATION, message)

    @classmethod
    def internal(cls, message: str) -> FerrumError:
        return cls(ErrorKind.INTERNAL, message)

    @classmethod
    def cancelled(cls, message: str) -> FerrumError:
        return cls(ErrorKind.CANCELLED, message)

    @classmethod
    def not_found(cls, message: str) -> FerrumError:
        return cls(ErrorKind.NOT_FOUND, message)

    @classmethod
    def already_exists(cls, message: str) -> FerrumError:
        return cls(ErrorKind.ALREADY_EXISTS, message)

    @classmethod
    def unsupported(cls, message: str) -> FerrumError:
        return cls(ErrorKind.UNSUPPORTED, message)

    @classmethod
    def invalid_format(cls, message: str) -> FerrumError:
        return cls(ErrorKind.INVALID_FORMAT, message)

    @classmethod
    def invalid_parameter(cls, message: str) -> FerrumError:
        return cls(ErrorKind.INVALID_PARAMETER, message)
