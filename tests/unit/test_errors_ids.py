import pytest

from shim import errors
from shim.ids import validate_id


@pytest.mark.parametrize(
    "cls,code",
    [
        (errors.NotFound, errors.Code.NOT_FOUND),
        (errors.InvalidState, errors.Code.FAILED_PRECONDITION),
        (errors.VMLaunchFailure, errors.Code.INTERNAL),
        (errors.ResourceExhausted, errors.Code.RESOURCE_EXHAUSTED),
    ],
)
def test_code_table_walks_the_mro(cls, code):
    exc = cls("x", "created", ["running"]) if cls is errors.InvalidState else cls("boom")
    assert errors.code_of(exc) == code


def test_status_round_trip_keeps_the_class():
    code, msg = errors.to_status(errors.NotFound("container c1 not found"))
    back = errors.from_status(code, msg)
    assert isinstance(back, errors.NotFound) and str(back) == "container c1 not found"


def test_foreign_exceptions():
    assert errors.code_of(TimeoutError()) == errors.Code.DEADLINE_EXCEEDED
    assert errors.code_of(KeyError("x")) == errors.Code.INTERNAL
    assert isinstance(errors.from_status(99, "?"), errors.Internal)


def test_invalid_state_message():
    import enum

    class S(enum.Enum):
        CREATED = 1
        RUNNING = 2

    e = errors.InvalidState("task c1", S.CREATED, S.RUNNING)
    assert str(e) == "task c1 is created, must be running"


@pytest.mark.parametrize("bad", ["", "a/b", "..", "../x", "a..b", "-x", "x" * 77, "a b", "a\x00"])
def test_bad_ids_are_invalid_argument(bad):
    with pytest.raises(errors.InvalidArgument):
        validate_id(bad)


@pytest.mark.parametrize("good", ["c1", "a.b-c_d", "0" * 64, "x" * 76])
def test_good_ids(good):
    assert validate_id(good) == good
