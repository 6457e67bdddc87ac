"""containerd as a node's image store (:class:`ContainerdStore`, :mod:`.store`), through
containerd's own client, ``ctr`` (:mod:`.ctr`; what it prints: :mod:`.output`).

A Kubernetes node that runs containerd without Docker keeps the images of its pods in
containerd's ``k8s.io`` namespace: an image pulled there is one the kubelet finds, and so
does anything that runs containers through the CRI. The worker runs ``ctr`` (installed in
its image) against the node's containerd socket:

- ``ctr images ls name==NAME``, then ``ctr content get`` of the manifest: is the image
  there, its digest and its id (the config's digest, as Docker calls an image's id);
- ``ctr images pull NAME``: the pull; its progress output is read as it comes, for
  progress messages and to notice a pull that has stopped moving (``stalled``);
- ``ctr version``: the engine's version, for the roster;
- ``ctr events``: containerd's image events, so that an image known to be there is
  answered from memory (:mod:`.events`, :mod:`worker.stores.image_index`).

Registry logins come from the same docker client ``config.json`` as the Docker Engine's
(:mod:`worker.stores.registry_logins`): ``ctr`` is given the user name with ``--user``, and the
password through a pseudo-terminal it reads at start (``ctr`` reads a password from
nowhere else but its command line, which any process on the node may read).

Registries on 127.0.0.0/8 and ``localhost`` are pulled over plain HTTP, as the Docker
Engine does by default; anything else about registries (mirrors, certificate
authorities, plain HTTP elsewhere) is containerd's own ``hosts.toml`` configuration, in
the directory ``PULLER_CONTAINERD_HOSTS_DIR`` names.

The store's modules: :mod:`.store` (the store, pruning's questions), :mod:`.ctr` (running
``ctr``, its failures, the password terminal), :mod:`.output` (reading what ``ctr`` prints),
:mod:`.events` (the image events feed), :mod:`.platforms` (which manifest of an index).
"""

from worker.stores.containerd.store import (
    DEFAULT_ADDRESS,
    DEFAULT_NAMESPACE,
    DEFAULT_ROOT,
    ContainerdStore,
)

__all__ = ["DEFAULT_ADDRESS", "DEFAULT_NAMESPACE", "DEFAULT_ROOT", "ContainerdStore"]
