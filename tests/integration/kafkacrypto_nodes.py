"""Offline, password-based provisioning of KafkaCrypto nodes for the tests.

KafkaCrypto trusts a chain of signatures: a *root of trust* (ROT) key signs one
*provisioner* key per role (producer, consumer), and that provisioner key signs the
node's own signing key, limited to some topic roots and usages. Every node keeps the
ROT's public key in its allowlist and accepts key-exchange messages only from nodes
whose chain ends in it. With password-based provisioning both keys derive from
passwords, so two nodes provisioned in one temporary folder with the same two
passwords trust each other, and a node provisioned with another ROT password trusts
nobody else.

This is the same trust set-up as OpenMSIStream's own test fixtures and kafkacrypto's
``simple-provision.py`` build, written here with kafkacrypto's public building blocks.
A node is a folder ``<folder>/<node_id>/`` with ``<node_id>.config`` (the KafkaCrypto
store), ``<node_id>.crypto`` (its signing key) and ``<node_id>.seed`` (its ratchet,
created by KafkaCrypto on first use).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import subprocess
import sys
import time
import warnings
from pathlib import Path

import msgpack

from tests.integration.programs import write_omsi_config

__all__ = ["ROLES", "provision_node", "write_node_config"]

#: What each role's signing key may do in the key exchange.
ROLES = {
    "producer": ["key-encrypt"],
    "consumer": ["key-encrypt-request", "key-encrypt-subscribe"],
}
_LIFETIME = 10 * 365 * 24 * 3600  # seconds a node's certificate stays valid
_NO_POISON = b"\x90"  # a packed empty list: no restriction on the ROT itself


def _pack(value) -> bytes:
    from kafkacrypto.utils import msgpack_default_pack
    return msgpack.packb(value, default=msgpack_default_pack, use_bin_type=True)


def _keys(rot_password: str, provisioner_password: str):
    """The ROT and the provisioner keys derived from the two passwords (kafkacrypto
    prints what it derives; that noise is kept out of the test output)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        from kafkacrypto.provisioners import PasswordProvisioner, PasswordROT
    with contextlib.redirect_stdout(io.StringIO()):
        rot = PasswordROT(rot_password, 1)
        provisioners = PasswordProvisioner(provisioner_password, rot._pk, 1)
    return rot, provisioners


def provision_node(folder: Path, node_id: str, role: str, topic_roots: list[str], *,
                   rot_password: str, provisioner_password: str) -> Path:
    """Provision ``node_id`` as a ``role`` ("producer" or "consumer") for the given
    topic roots; returns the path of its KafkaCrypto config file.

    It runs in a child process, as an offline provisioning tool would: kafkacrypto's
    store keeps its file locked until the object is garbage-collected (its close()
    fails before unlocking), and pytest's log capture holds on to such objects, which
    would lock the node out of the programs under test."""
    done = subprocess.run(
        [sys.executable, "-m", "tests.integration.kafkacrypto_nodes", str(folder), node_id,
         role, json.dumps(list(topic_roots)), rot_password, provisioner_password],
        cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"provisioning {node_id} failed:\n{done.stdout}{done.stderr}"
    return Path(done.stdout.strip().splitlines()[-1])


def _provision(folder: Path, node_id: str, role: str, topic_roots: list[str], *,
               rot_password: str, provisioner_password: str) -> Path:
    from kafkacrypto import KafkaCryptoStore
    from kafkacrypto.cryptokey import CryptoKey

    usages = ROLES[role]
    rot, provisioners = _keys(rot_password, provisioner_password)
    # Link 1: the ROT vouches for this role's provisioner key (no expiry).
    link_provisioner = rot._sk.crypto_sign(
        _pack([0, _pack([["usages", usages]]), provisioners._pk[role]]))
    node_dir = folder / node_id
    node_dir.mkdir(parents=True, exist_ok=True)
    signing_key = CryptoKey(str(node_dir / f"{node_id}.crypto"), keytypes=[1])
    index = next(i for i in range(signing_key.get_num_spk())
                 if signing_key.get_spk(i).same_type(1))
    # Link 2: the provisioner vouches for the node's key, for these topics and usages.
    restrictions = _pack([["usages", usages], ["topics", list(topic_roots)]])
    link_node = provisioners._sk[role].crypto_sign(
        _pack([time.time() + _LIFETIME, restrictions, signing_key.get_spk(index)]))
    config = node_dir / f"{node_id}.config"
    store = KafkaCryptoStore(str(config), node_id, conf_global_logger=False)
    try:
        store.store_value("maxage", _LIFETIME, section="crypto")
        store.store_value(f"chain{index}", _pack([link_provisioner, link_node]),
                          section="chains")
        store.store_value(f"rot{index}", _pack([0, _NO_POISON, rot._pk]),
                          section="allowlist")
        # A new store trusts kafkacrypto's published temporary root; provisioning ends that.
        if store.load_value("temporary", section="allowlist"):
            store.store_value("temporary", None, section="allowlist")
        store.store_value("cryptokey", f"file#{node_id}.crypto")
        store.store_value("ratchet", f"file#{node_id}.seed")
        if role == "producer":
            store.store_value("mgmt_long_keyindex", True)
        # Re-send an unanswered key request after 5 s instead of 60 (tests are short).
        store.store_value("crypto_sub_interval", 5)
    finally:
        store.close()
    return config


def write_node_config(path: Path, bootstrap: str, node_id: str | None = None,
                      config_file: Path | None = None) -> Path:
    """An OpenMSIStream config file with a ``[kafkacrypto]`` section naming the node
    (``node_id``, looked up next to this file) or its store (``config_file``). The
    local broker is plaintext; KafkaCrypto's own default would be SSL."""
    crypto = (f"node_id = {node_id}\n" if node_id is not None
              else f"config_file = {config_file}\n")
    return write_omsi_config(path, bootstrap, broker_extra="security.protocol = PLAINTEXT\n",
                             sections=f"\n[kafkacrypto]\n{crypto}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="provision one KafkaCrypto test node")
    for name in ("folder", "node_id", "role", "topic_roots", "rot_password",
                 "provisioner_password"):
        parser.add_argument(name)
    args = parser.parse_args()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        import logging
        logging.disable(logging.WARNING)  # kafkacrypto's notes on the new files
        path = _provision(Path(args.folder), args.node_id, args.role,
                          json.loads(args.topic_roots), rot_password=args.rot_password,
                          provisioner_password=args.provisioner_password)
    print(path)
