"""InputError: one-line messages that survive DataLoader workers and pickling."""

import pickle

from torch.utils.data import DataLoader, Dataset

from geocmid.errors import InputError


class _Broken(Dataset[int]):
    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int) -> int:
        raise InputError('scene.tif', 'truncated GeoTIFF')


def test_message_names_source_and_problem() -> None:
    err = InputError('scene.tif', 'raster has no CRS')
    assert str(err) == 'scene.tif: raster has no CRS'
    assert (err.source, err.problem) == ('scene.tif', 'raster has no CRS')


def test_pickle_round_trip() -> None:
    err = pickle.loads(pickle.dumps(InputError('a.tif', 'bad bands')))
    assert isinstance(err, InputError)
    assert str(err) == 'a.tif: bad bands'


def test_worker_error_stays_an_input_error_with_one_line() -> None:
    loader = DataLoader(_Broken(), num_workers=1)
    try:
        next(iter(loader))
    except InputError as err:
        assert str(err) == 'scene.tif: truncated GeoTIFF'
    else:  # pragma: no cover - the loader must raise
        raise AssertionError('no error raised')
