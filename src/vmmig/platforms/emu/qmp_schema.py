"""The commands an emulated machine serves over QMP, and the checking of their arguments.

A command's handler declares its QMP arguments with its own signature, as
QAPI generates a C prototype from a schema; the server checks every request
against it before the handler runs::

    commands = CommandTable()

    @commands.command("x-query-dirty")
    async def query_dirty(*, start_gpa: int, pages: int, clear: bool = False) -> dict[str, str]:
        ...

A parameter without a default is required, and ``_`` in its name is ``-`` on
the wire (``start_gpa`` is ``start-gpa``, QAPI's spelling). Handlers may be
plain functions (they run on the event loop, so they must be quick) or
coroutine functions. They return the JSON value of the reply (``None`` is
``{}``, as in QEMU), or a :class:`WithFds` to pass file descriptors with it,
and raise :class:`QmpCommandError` to fail with a QMP error class.

The annotations allowed are QAPI's built-in types:

=====================  ===========  ==========================================
annotation             QAPI type    the argument must be
=====================  ===========  ==========================================
``str``                ``str``      a JSON string
``int``                ``int``      a JSON integer (``true`` is not one)
``float``              ``number``   a JSON number; the handler gets a float
``bool``               ``bool``     ``true`` or ``false``
``Literal["a", "b"]``  an enum      one of those strings
``list[T]``            ``['T']``    a JSON array of ``T``
``dict[str, T]``       (none)       a JSON object with ``T`` values
``Any``                ``any``      any JSON value, ``null`` included
``T | None = None``    ``'*name'``  optional ``T``
=====================  ===========  ==========================================

As in QEMU, an optional argument is omitted, never ``null``, and a wrong one
gets a ``GenericError`` naming it the way QEMU does: ``Parameter 'pages' is
missing``, ``Parameter 'pages' expects integer``, ``Parameter 'list[2]'
expects string``, ``Parameter 'mode' does not accept value 'x'``,
``Parameter 'page' is unexpected``. A handler whose signature cannot be
checked this way is refused when it is registered, with :exc:`TypeError`.
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, Literal, TypeVar

import attrs

from vmmig.errors import PlatformError


__all__ = [
    "BUILTIN_COMMANDS",
    "Command",
    "CommandTable",
    "ErrorClass",
    "QmpCommandError",
    "WithFds",
]

#: QEMU's QMP error classes (``QapiErrorClass``); new code uses ``GenericError``.
ErrorClass = Literal[
    "GenericError", "CommandNotFound", "DeviceNotActive", "DeviceNotFound", "KVMMissingCap"
]

#: Commands the server implements itself; a :class:`CommandTable` refuses them.
BUILTIN_COMMANDS = frozenset({"qmp_capabilities", "query-commands", "query-version", "quit"})

_H = TypeVar("_H", bound=Callable[..., object])


class QmpCommandError(PlatformError):
    """A QMP command failed, with a QMP error class and a description.

    A handler raises it to make the server reply
    ``{"error": {"class": error_class, "desc": desc}}``;
    :func:`~vmmig.platforms.emu.qmp_server.receive_fd_command` raises it
    when the server replied so.

    :param error_class: the QMP error class, ``"GenericError"`` unless QEMU
        uses another one for the same failure.
    :param desc: the human-readable description, one line.
    """

    def __init__(self, error_class: ErrorClass, desc: str) -> None:
        super().__init__(desc)
        self.error_class: str = error_class
        self.desc = desc


@attrs.frozen
class WithFds:
    """A command result whose reply carries file descriptors (``SCM_RIGHTS``).

    The server sends duplicates, so the handler keeps ownership of ``fds``
    and may close them as soon as it has returned.

    :param value: the reply's ``return`` value (``None`` for ``{}``).
    :param fds: the file descriptors, in the order the client receives them.
    """

    value: object
    fds: tuple[int, ...]


class _Mismatch(Exception):
    """An argument value does not fit its type; ``path`` locates it inside the argument."""

    def __init__(self, problem: str) -> None:
        super().__init__(problem)
        self.problem = problem
        #: Member and index suffixes, innermost first (``.key``, ``[3]``).
        self.path: list[str] = []


_Check = Callable[[object], object]


def _check_str(value: object) -> object:
    if isinstance(value, str):
        return value
    raise _Mismatch("expects string")


def _check_int(value: object) -> object:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise _Mismatch("expects integer")


def _check_number(value: object) -> object:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    raise _Mismatch("expects number")


def _check_bool(value: object) -> object:
    if isinstance(value, bool):
        return value
    raise _Mismatch("expects boolean")


def _check_any(value: object) -> object:
    return value


_SCALARS: dict[object, _Check] = {
    str: _check_str, int: _check_int, float: _check_number, bool: _check_bool, Any: _check_any,
}


def _enum_checker(members: frozenset[str]) -> _Check:
    def check(value: object) -> object:
        if _check_str(value) not in members:
            raise _Mismatch(f"does not accept value '{value}'")
        return value

    return check


def _list_checker(element: _Check) -> _Check:
    def check(value: object) -> object:
        if not isinstance(value, list):
            raise _Mismatch("expects array")
        checked = []
        for index, item in enumerate(value):
            try:
                checked.append(element(item))
            except _Mismatch as err:
                err.path.append(f"[{index}]")
                raise
        return checked

    return check


def _object_checker(member: _Check) -> _Check:
    def check(value: object) -> object:
        if not isinstance(value, dict):
            raise _Mismatch("expects object")
        checked = {}
        for key, item in value.items():
            try:
                checked[key] = member(item)
            except _Mismatch as err:
                err.path.append(f".{key}")
                raise
        return checked

    return check


def _checker(annotation: object) -> _Check:
    """Compile the check of one QAPI type, given as a Python annotation."""
    if annotation in _SCALARS:
        return _SCALARS[annotation]
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal and args and all(isinstance(arg, str) for arg in args):
        return _enum_checker(frozenset(args))
    if origin is list:
        return _list_checker(_checker(args[0]))
    if origin is dict and args[0] is str:
        return _object_checker(_checker(args[1]))
    raise TypeError(f"{annotation} is not a QMP argument type")


@attrs.frozen
class _Param:
    wire_name: str
    python_name: str
    check: _Check
    required: bool


def _param(parameter: inspect.Parameter, annotation: object) -> _Param:
    if parameter.kind not in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY):
        raise TypeError(f"parameter {parameter.name} must be passable by keyword, alone")
    if annotation is inspect.Parameter.empty:
        raise TypeError(f"parameter {parameter.name} needs a type annotation")
    required = parameter.default is parameter.empty
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        others = [arg for arg in typing.get_args(annotation) if arg is not types.NoneType]
        if len(others) != 1 or parameter.default is not None:
            raise TypeError(f"parameter {parameter.name}: the only union allowed is 'T | None'"
                            " with the default None")
        annotation = others[0]
    try:
        check = _checker(annotation)
    except TypeError as err:
        raise TypeError(f"parameter {parameter.name}: {err}") from None
    return _Param(parameter.name.replace("_", "-"), parameter.name, check, required)


@attrs.frozen
class Command:
    """A registered command: its handler and the checks of its arguments.

    :param name: the QMP command name.
    :param handler: the function it calls.
    """

    name: str
    handler: Callable[..., object]
    _params: tuple[_Param, ...]

    @classmethod
    def from_handler(cls, name: str, handler: Callable[..., object]) -> Command:
        """Read the argument schema off the handler's signature (see the module's documentation).

        :param name: the QMP command name.
        :param handler: a function or coroutine function taking the arguments by keyword.
        :return: the command.
        :raise TypeError: the signature cannot be checked as QMP arguments.
        """
        try:
            hints = typing.get_type_hints(handler)
            parameters = inspect.signature(handler).parameters.values()
            params = tuple(_param(p, hints.get(p.name, p.empty)) for p in parameters)
        except (NameError, TypeError) as err:
            raise TypeError(f"QMP command {name}: {err}") from err
        return cls(name, handler, params)

    def bind(self, arguments: Mapping[str, object]) -> dict[str, object]:
        """Check a request's arguments in QEMU's order and map them to the handler's keywords.

        :param arguments: the request's ``arguments`` object.
        :return: keyword arguments for :attr:`handler`.
        :raise QmpCommandError: a ``GenericError`` for the first wrong argument.
        """
        bound: dict[str, object] = {}
        for param in self._params:
            if param.wire_name in arguments:
                try:
                    bound[param.python_name] = param.check(arguments[param.wire_name])
                except _Mismatch as err:
                    where = param.wire_name + "".join(reversed(err.path))
                    problem = f"Parameter '{where}' {err.problem}"
                    raise QmpCommandError("GenericError", problem) from None
            elif param.required:
                raise QmpCommandError("GenericError", f"Parameter '{param.wire_name}' is missing")
        if len(bound) < len(arguments):
            known = {param.wire_name for param in self._params}
            unexpected = next(name for name in arguments if name not in known)
            raise QmpCommandError("GenericError", f"Parameter '{unexpected}' is unexpected")
        return bound


class CommandTable:
    """The commands a machine registers for its QMP server, by name."""

    def __init__(self) -> None:
        self._commands: dict[str, Command] = {}

    def command(self, name: str) -> Callable[[_H], _H]:
        """Register the decorated function as the handler of command ``name``.

        :param name: the QMP command name; QEMU's where QEMU has one, else ``x-...``.
        :return: a decorator that returns the function unchanged.
        :raise ValueError: the name is taken (see :meth:`add`).
        :raise TypeError: the signature cannot be checked as QMP arguments.
        """

        def register(handler: _H) -> _H:
            self.add(name, handler)
            return handler

        return register

    def add(self, name: str, handler: Callable[..., object]) -> None:
        """Register ``handler`` as command ``name``.

        :param name: the QMP command name.
        :param handler: the function or coroutine function.
        :raise ValueError: the name is registered already, or built into the server.
        :raise TypeError: the signature cannot be checked as QMP arguments.
        """
        if name in BUILTIN_COMMANDS or name in self._commands:
            raise ValueError(f"QMP command {name} is defined already")
        self._commands[name] = Command.from_handler(name, handler)

    def get(self, name: str) -> Command | None:
        """Return the command called ``name``, or ``None``."""
        return self._commands.get(name)

    def names(self) -> list[str]:
        """Return the names of the registered commands, sorted."""
        return sorted(self._commands)
