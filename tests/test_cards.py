"""Model cards: JSON round trip, atomic writing, and one-line errors for bad cards."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import geocmid
from geocmid.errors import InputError
from geocmid.io.cards import CARD_NAME, ClassInfo, ModelCard, read_card, write_card


def make_card(**overrides: Any) -> ModelCard:
    fields: dict[str, Any] = {
        'method': 'cmid',
        'backbone': 'resnet18',
        'bands': ['red', 'green', 'blue', 'nir'],
        'band_indices': [1, 2, 3, 4],
        'mean': [90.5, 95.0, 80.25, 120.0],
        'std': [30.0, 31.5, 29.0, 40.0],
        'patch_size': 64,
        'resolution': 5.0,
        'data': {'files': 3, 'crs': 'EPSG:26914'},
        'config': {'lr': 0.001, 'epochs': 2},
    }
    fields.update(overrides)
    return ModelCard(**fields)


def card_body(**overrides: Any) -> dict[str, Any]:
    body = make_card().to_dict()
    body.update(overrides)
    return body


def test_json_round_trip_keeps_every_field() -> None:
    card = make_card(
        task='segmentation',
        classes=[ClassInfo('water', (0, 0, 255)), ClassInfo('crop', (255, 200, 0))],
        tile_size=256,
        backbone_kwargs={'img_size': 64},
        provenance={'encoder': 'run/encoder.pt', 'sha256': 'ab' * 32},
    )
    again = ModelCard.from_json(card.to_json())
    assert again == card
    assert again.classes == [ClassInfo('water', (0, 0, 255)), ClassInfo('crop', (255, 200, 0))]


def test_json_spells_out_in_chans_version_and_bands() -> None:
    body = json.loads(make_card().to_json())
    assert body['in_chans'] == 4
    assert body['card_version'] == 1
    assert body['bands'] == ['red', 'green', 'blue', 'nir']
    assert body['band_indices'] == [1, 2, 3, 4]
    assert body['geocmid_version'] == geocmid.__version__
    assert body['resolution'] == 5.0
    assert body['classes'] is None


def test_write_card_into_folder_and_beside_weights(tmp_path: Path) -> None:
    card = make_card()
    assert write_card(tmp_path, card) == tmp_path / CARD_NAME
    other = tmp_path / 'other'
    other.mkdir()
    assert write_card(other / 'encoder.pt', card) == other / CARD_NAME
    assert read_card(tmp_path) == card
    assert read_card(other / 'encoder.pt') == card
    assert read_card(other / CARD_NAME) == card
    # Nothing but the card is left behind: the temporary file was renamed into place.
    assert sorted(p.name for p in tmp_path.iterdir()) == [CARD_NAME, 'other']


def test_write_card_refuses_to_overwrite_without_flag(tmp_path: Path) -> None:
    write_card(tmp_path, make_card())
    with pytest.raises(InputError, match='exists; use --overwrite'):
        write_card(tmp_path, make_card(method='gersp'))
    assert read_card(tmp_path).method == 'cmid'
    write_card(tmp_path, make_card(method='gersp'), overwrite=True)
    assert read_card(tmp_path).method == 'gersp'


def test_read_card_missing_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=f'no {CARD_NAME} in this folder') as info:
        read_card(tmp_path)
    assert str(tmp_path) in str(info.value)
    weights = tmp_path / 'encoder.pt'
    weights.write_bytes(b'')
    with pytest.raises(InputError, match=f'no {CARD_NAME} beside this file'):
        read_card(weights)


def test_read_card_invalid_json(tmp_path: Path) -> None:
    (tmp_path / CARD_NAME).write_text('{"method": "cmid",')
    with pytest.raises(InputError, match='not valid JSON') as info:
        read_card(tmp_path)
    assert str(tmp_path / CARD_NAME) in str(info.value)


@pytest.mark.parametrize(
    ('change', 'message'),
    [
        ({'bands': None}, 'bands must be a non-empty list'),
        ({'mean': [1.0, 2.0]}, 'mean has 2 value'),
        ({'std': [1.0, 0.0, 1.0, 1.0]}, 'std values must be positive'),
        ({'mean': None}, 'mean and std must both be given'),
        ({'band_indices': [0, 1, 2, 3]}, 'band_indices must be a list of 1-based'),
        ({'in_chans': 3}, 'in_chans is 3 but 4 band'),
        ({'patch_size': 0}, 'patch_size must be a positive integer'),
        ({'resolution': -1}, 'resolution must be a positive number'),
        ({'classes': [{'name': 'water', 'color': [0, 0, 300]}]}, r'classes\[0\].color'),
        ({'classes': [{'name': 'water'}]}, r'classes\[0\] must have exactly'),
        ({'bands': ['red', 'red', 'blue', 'nir']}, 'duplicate names'),
        ({'card_version': 99}, 'newer than this geocmid'),
        ({'backbone_kwargs': 'img_size=64'}, 'backbone_kwargs must be a JSON object'),
    ],
)
def test_invalid_values_name_the_file_and_field(
    tmp_path: Path, change: dict[str, Any], message: str
) -> None:
    path = tmp_path / CARD_NAME
    path.write_text(json.dumps(card_body(**change)))
    with pytest.raises(InputError, match=message) as info:
        read_card(path)
    assert str(info.value).startswith(f'{path}: ')
    assert '\n' not in str(info.value)


def test_missing_and_unknown_keys_are_named(tmp_path: Path) -> None:
    path = tmp_path / CARD_NAME
    body = card_body()
    del body['backbone'], body['bands']
    path.write_text(json.dumps(body))
    with pytest.raises(InputError, match='lacks required key.*backbone, bands'):
        read_card(path)
    path.write_text(json.dumps(card_body(colour_map='viridis')))
    with pytest.raises(InputError, match='unknown key.*colour_map'):
        read_card(path)
    path.write_text('[1, 2]')
    with pytest.raises(InputError, match='must be a JSON object'):
        read_card(path)


def test_constructor_validates() -> None:
    assert make_card(in_chans=4).in_chans == make_card().in_chans == 4
    with pytest.raises(InputError, match='in_chans is 3 but 4 band'):
        make_card(in_chans=3)
    from_tuples = make_card(bands=('r', 'g', 'b', 'n'), band_indices=(1, 2, 3, 4))
    assert from_tuples.bands == ['r', 'g', 'b', 'n'] and from_tuples.band_indices == [1, 2, 3, 4]
    with pytest.raises(InputError, match='3 band_indices for 4 bands'):
        make_card(band_indices=[1, 2, 3])
    with pytest.raises(InputError, match='backbone must be a non-empty string'):
        make_card(backbone='')
