"""The LayerMounter: from a Prepare's labels to a layer served at a snapshot directory.

A zest layer: resolve the manifest (verified by its digest), fetch the TOC with
one range request (annotations, else the footer), verify it, keep it under
`<root>/tocs/`, ask the FUSE process to serve it, and bind-mount its directory
on the snapshot's `fs`. Any other layer: download its blob (all such layers of
the image in parallel), unpack it into `fs` and check its DiffID.

What a layer needs to be served again after a restart is written next to the
snapshot (`<root>/snapshots/<id>/remote.json`), so re-mounting needs no network.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import logging
import os
import subprocess
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from chunkstore import format as fmt
from chunkstore import toc as tocmod
from chunkstore.digest import Digest
from snapshotter import labels as L
from snapshotter.errors import Unavailable
from snapshotter.fuse.protocol import ControlError
from snapshotter.fuseproc import FuseProcess
from snapshotter.image import store as st
from snapshotter.image.reference import Kind, parse_reference
from snapshotter.profiles import Profile, parse_artifact, profile_tag
from snapshotter.registry.client import RegistryClient
from snapshotter.registry.errors import NotFoundError
from snapshotter.unpack import BlobDownloads, UnpackError, unpack_blob

log = logging.getLogger(__name__)

STATE_FILE = "remote.json"
_RESOLVED_SECONDS = 30.0  # how long a tag's resolution serves the image's later layers


class NotServable(Exception):
    """The daemon cannot serve this layer; containerd's ordinary path takes it."""


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


_libc = ctypes.CDLL(None, use_errno=True)
_MS_BIND = 4096


def _bind_mount(src: Path, dst: Path) -> None:
    """mount --bind, without a fork and exec on the Prepare path."""
    if _libc.mount(bytes(src), bytes(dst), None, _MS_BIND, None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"bind mount of {src} on {dst}: {os.strerror(err)}")


def _mount_state(path: Path, fuse_root: Path) -> str:
    """"mounted" (a bind of the live FUSE mount), "stale" (a bind left from a FUSE process
    that died) or "none". The device number tells a live bind from a stale one: the kernel
    may answer stat from its attribute cache even after the connection is gone."""
    try:
        st = os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:
            return "stale"
        raise
    if not os.path.ismount(path):
        return "none"
    try:
        live = os.stat(fuse_root).st_dev
    except OSError:
        return "stale"
    return "mounted" if st.st_dev == live else "stale"


class RemoteLayers:
    def __init__(self, root: Path, fuse: FuseProcess, *, plain_http_hosts: frozenset[str] = (
            frozenset()), hosts_dir: Path | None = None, unpack: bool = True,
            unpack_parallel: int = 3, prefetch: bool = True, predict: bool = True):
        self.hosts_dir = hosts_dir
        self.predict = predict
        self.root = root
        self.fuse = fuse
        self.plain_http_hosts = plain_http_hosts
        self.unpack = unpack
        self.prefetch = prefetch
        self.tocs = root / "tocs"
        self.tocs.mkdir(parents=True, exist_ok=True)
        self.blobs = BlobDownloads(root / "blobs", unpack_parallel)
        self._clients: dict[str, RegistryClient] = {}
        self._manifests: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._profiles: dict[str, Profile | None] = {}
        # tag -> manifest digest, as resolved for the image's earlier layers: containerd asks
        # for an image's layers one by one, and each would resolve the tag again (a round trip)
        self._resolved: dict[tuple[str, str, str], tuple[float, str]] = {}
        self._toc_jobs: dict[str, Future[None]] = {}  # by TOC digest hex, while in flight
        # image configs by digest: for the prediction, fetched with the first lazy layer's
        # TOC, and for each unpacked layer's DiffID, fetched once per image
        self._config_jobs: OrderedDict[str, Future[dict[str, Any]]] = OrderedDict()
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="zest-remote")
        # by manifest digest: the prediction started once the image's TOCs were in, before
        # containerd asked for all its layers; True when it ran
        self._early: OrderedDict[str, Future[bool]] = OrderedDict()
        # TOC bytes fetched where a Prepare's label said, before the manifest was in, by
        # (layer digest, offset, size); verified against the manifest's TOC digest on use
        self._toc_bytes: OrderedDict[tuple[str, int, int], Future[bytes]] = OrderedDict()
        self._lock = threading.Lock()

    # -- registry --------------------------------------------------------------
    def _client(self, host: str) -> RegistryClient:
        with self._lock:
            c = self._clients.get(host)
            if c is None:
                c = self._clients[host] = RegistryClient.for_host(
                    host, self.hosts_dir, plain_http=host in self.plain_http_hosts)
            return c

    def _manifest(self, client: RegistryClient, repo: str, digest: str) -> dict[str, Any]:
        with self._lock:
            hit = self._manifests.get(digest)
        if hit is not None:
            return hit
        m = client.get_manifest(repo, digest)  # verified against the digest
        manifest: dict[str, Any] = json.loads(m.data)
        if m.media_type not in st.MANIFEST_TYPES:
            raise NotServable(f"{digest} is a {m.media_type}, not an image manifest")
        self._remember(digest, manifest)
        return manifest

    def _remember(self, digest: str, manifest: dict[str, Any]) -> None:
        with self._lock:
            self._manifests[digest] = manifest
            while len(self._manifests) > 64:
                self._manifests.popitem(last=False)

    def _profile(self, client: RegistryClient, repo: str, manifest_digest: str) -> Profile | None:
        """The image's published profile (an artifact tagged after its manifest), if any."""
        with self._lock:
            if manifest_digest in self._profiles:
                return self._profiles[manifest_digest]
        profile = None
        try:
            art = client.get_manifest(repo, profile_tag(manifest_digest))
            blob_digest = parse_artifact(art, manifest_digest)
            if blob_digest is not None:
                with client.open_blob(repo, blob_digest) as f:
                    data = f.read(64 << 20)
                Digest.parse(blob_digest).verify(data, "profile")
                profile = Profile.decode(data)
                if profile.manifest != manifest_digest:
                    log.info("ignoring profile: it was recorded for another manifest",
                             extra={"kv": {"profile": profile.manifest,
                                           "manifest": manifest_digest}})
                    profile = None
        except NotFoundError:
            pass
        except Exception as exc:  # a profile is an optimisation: never fail a pull for it
            log.info("no profile used", extra={"kv": {"manifest": manifest_digest,
                                                      "reason": exc}})
        with self._lock:
            self._profiles[manifest_digest] = profile
        return profile

    def _config(self, client: RegistryClient, repo: str,
                manifest: dict[str, Any]) -> dict[str, Any]:
        """The image config (only layers that are unpacked need it, for their DiffIDs)."""
        cdesc = manifest["config"]
        with client.open_blob(repo, cdesc["digest"]) as f:
            raw = f.read(int(cdesc["size"]) + 1)
        Digest.parse(cdesc["digest"]).verify(raw, "image config")
        config: dict[str, Any] = json.loads(raw)
        return config

    def _find_manifest(self, client: RegistryClient, repo: str, reference: str,
                       layer_digest: str) -> str:
        """The digest of the manifest holding layer_digest, for labels that name only the
        image (ctr-remote): the image's manifest, or in an index the first that has it. A
        resolution made for this image in the last few seconds is used again while the
        manifest it gave holds the layer: the layer is then the same bytes either way."""
        key = (client.host, repo, reference)
        with self._lock:
            when, digest = self._resolved.get(key, (0.0, ""))
            known = self._manifests.get(digest)
        if (known is not None and time.monotonic() - when < _RESOLVED_SECONDS
                and any(x["digest"] == layer_digest for x in known.get("layers") or [])):
            return digest
        digest = self._resolve(client, repo, reference, layer_digest)
        now = time.monotonic()
        with self._lock:  # old resolutions go: one entry per tag ever pulled would only grow
            self._resolved = {k: v for k, v in self._resolved.items()
                              if now - v[0] < _RESOLVED_SECONDS}
            self._resolved[key] = (now, digest)
        return digest

    def _resolve(self, client: RegistryClient, repo: str, reference: str,
                 layer_digest: str) -> str:
        top = client.get_manifest(repo, reference)
        if top.media_type in st.MANIFEST_TYPES:
            self._remember(top.digest, json.loads(top.data))  # saves fetching it again
            return top.digest
        for d in json.loads(top.data).get("manifests") or []:
            child = client.get_manifest(repo, d["digest"])
            if child.media_type in st.MANIFEST_TYPES and any(
                    x["digest"] == layer_digest for x in json.loads(child.data)["layers"]):
                self._remember(child.digest, json.loads(child.data))
                return child.digest
        raise NotServable(f"no manifest of {repo}:{reference} has layer {layer_digest}")

    # -- LayerMounter ----------------------------------------------------------
    def mount(self, mountpoint: Path, labels: Mapping[str, str]) -> None:
        state_path = mountpoint.parent / STATE_FILE
        if state_path.exists():
            self._attach(json.loads(state_path.read_text()), mountpoint)
            return
        req = L.remote_layer_request(labels)
        if req is None or not req.image_ref:
            raise NotServable("Prepare has no image reference or layer digest labels "
                              "(pull with `zest pull`, ctr-remote, CRI or nerdctl)")
        ref = parse_reference(req.image_ref)
        if ref.kind != Kind.REGISTRY:
            raise NotServable(f"{req.image_ref} is not a registry reference")
        client = self._client(ref.api_host)
        self._toc_head_start(client, ref.api_host, ref.repository, req.layer_digest, labels)
        manifest_digest = req.manifest_digest or self._find_manifest(
            client, ref.repository, ref.reference or "latest", req.layer_digest)
        manifest = self._manifest(client, ref.repository, manifest_digest)
        layers = manifest.get("layers") or []
        index = next((i for i, d in enumerate(layers) if d["digest"] == req.layer_digest), None)
        if index is None:
            raise NotServable(f"layer {req.layer_digest} is not in manifest "
                              f"{req.manifest_digest}")
        desc = layers[index]
        what = f"{req.image_ref} layer {index + 1}/{len(layers)} {req.layer_digest}"
        footer = fmt.footer_from_annotations(desc.get("annotations") or {})
        profile_job = None
        if footer is not None:
            # the profile lookup (one round trip, usually a 404) overlaps the TOC fetch
            profile_job = self._pool.submit(self._profile, client, ref.repository,
                                            manifest_digest)
            if self.predict:  # the guess needs the config: not a round trip later
                self._config_soon(client, ref.repository, manifest)
            # containerd asks for the layers one by one; fetch the later ones' TOCs meanwhile
            for n, later in enumerate(layers[index + 1:], index + 2):
                later_footer = fmt.footer_from_annotations(later.get("annotations") or {})
                if later_footer is not None:
                    self._start_toc(client, ref.api_host, ref.repository, later, later_footer,
                                    profile_job, f"{req.image_ref} layer {n}/{len(layers)} "
                                    f"{later['digest']}")
        if footer is None:
            config = self._config_soon(client, ref.repository, manifest).result()
            state = self._unpack(client, ref.repository, manifest, config, index, mountpoint,
                                 what)
        else:
            state = self._lazy(client, ref.api_host, ref.repository, desc, footer, mountpoint,
                               what)
            assert profile_job is not None
            if self.predict and self.prefetch:
                self._predict_early(client, ref.repository, manifest, manifest_digest,
                                    profile_job)
            profile = profile_job.result()
            if profile is not None and req.layer_digest in profile.layers:
                state["profile"] = profile.layers[req.layer_digest]
        _write_atomic(state_path, json.dumps(state).encode())
        try:
            # prefetch starts at once: the later layers' TOCs are already on their way
            self._attach(state, mountpoint)
        except BaseException:
            state_path.unlink(missing_ok=True)  # the snapshot stays an ordinary active one
            raise
        if index == len(layers) - 1 and state["kind"] == "lazy":
            names = self._served_names(manifest)
            if self.predict:
                # in the background: the Prepare answers now, the guess races the container
                threading.Thread(target=self._predict,
                                 args=(client, ref.repository, manifest, manifest_digest, names),
                                 name="zest-predict", daemon=True).start()

    def _served_names(self, manifest: dict[str, Any]) -> list[str]:
        """FUSE names of the manifest's layers that are served lazily, bottom first."""
        served = {x["digest"]: x["name"] for x in self.fuse.call("list")["layers"]
                  if x.get("digest")}
        return [served[d["digest"]] for d in manifest["layers"] if d["digest"] in served]

    def _config_soon(self, client: RegistryClient, repo: str,
                     manifest: dict[str, Any]) -> Future[dict[str, Any]]:
        digest = manifest["config"]["digest"]
        with self._lock:
            job = self._config_jobs.get(digest)
            if job is None or (job.done() and job.exception() is not None):  # failed: again
                job = self._config_jobs[digest] = self._pool.submit(
                    self._config, client, repo, manifest)
                while len(self._config_jobs) > 16:
                    self._config_jobs.popitem(last=False)
            return job

    def _predict(self, client: RegistryClient, repo: str, manifest: dict[str, Any],
                 manifest_digest: str, names: list[str] | list[dict[str, str]],
                 early: bool = False) -> bool:
        """Let the FUSE process guess what the entrypoint reads: the top layer is in place
        (`names`), or, `early`, every lazy layer's TOC is in (`names` are TOC and blob
        digests; False when the FUSE process lacks one of those layers, which the mount of
        the top layer then mends)."""
        with self._lock:
            ran = None if early else self._early.get(manifest_digest)
        try:
            if ran is not None and ran.result():
                return True  # guessed already
            config = self._config_soon(client, repo, manifest).result().get("config") or {}
            argv = (config.get("Entrypoint") or []) + (config.get("Cmd") or [])
            reply = self.fuse.call("predict", layers=names, argv=argv,
                                   env=config.get("Env") or [],
                                   workdir=config.get("WorkingDir") or "/", require_all=early)
            return not reply.get("missing")
        except Exception as exc:  # a guess that fails costs nothing but the guess
            log.info("no predicted prefetch", extra={"kv": {"reason": exc}})
            return False

    def _predict_early(self, client: RegistryClient, repo: str, manifest: dict[str, Any],
                       manifest_digest: str, profile_job: Future[Profile | None]) -> None:
        """Once every lazy layer's TOC is fetched and warmed (the FUSE process builds the
        layers ahead of their mounts), start the guess: containerd mounting the layers one
        by one took 35-80 ms more."""
        lazy = [(d, f) for d in manifest["layers"]
                if (f := fmt.footer_from_annotations(d.get("annotations") or {})) is not None]
        done: Future[bool] = Future()
        with self._lock:
            if manifest_digest in self._early or not lazy:
                return
            self._early[manifest_digest] = done
            while len(self._early) > 16:
                self._early.popitem(last=False)

        def run() -> None:
            ok = False
            try:
                for _, footer in lazy:
                    with self._lock:
                        job = self._toc_jobs.get(footer.toc_digest.hex)
                    if job is not None:
                        job.result()
                profile = profile_job.result()
                if profile is None or not profile.layers:  # a published profile beats a guess
                    ok = self._predict(client, repo, manifest, manifest_digest, [
                        {"toc_digest": str(f.toc_digest), "digest": d["digest"]}
                        for d, f in lazy], early=True)
            except Exception as exc:  # the mount of the top layer guesses instead
                log.info("no early prediction", extra={"kv": {"reason": exc}})
            done.set_result(ok)

        threading.Thread(target=run, name="zest-predict-early", daemon=True).start()

    def _toc_head_start(self, client: RegistryClient, host: str, repo: str, layer_digest: str,
                        labels: Mapping[str, str]) -> None:
        """Fetch the TOC where the Prepare's label says, while the manifest is fetched: the
        first layer's TOC arrives a round trip sooner (for a base layer's 330 KB TOC at
        100 Mbit/s, 20 ms, it came 60 ms after the manifest)."""
        hint = fmt.toc_hint(labels)
        if hint is None:
            return
        key = (layer_digest, hint.toc_offset, hint.toc_size)
        with self._lock:
            if (key in self._toc_bytes or hint.toc_digest.hex in self._toc_jobs
                    or (self.tocs / hint.toc_digest.hex).exists()):
                return  # here, or on its way since an earlier layer's Prepare
            self._toc_bytes[key] = self._pool.submit(
                self._read_toc, client, host, repo, layer_digest, hint,
                fmt.hot_hint(labels, fmt.LABEL_HOT))
            while len(self._toc_bytes) > 16:
                self._toc_bytes.popitem(last=False)

    def _read_toc(self, client: RegistryClient, host: str, repo: str, digest: str,
                  footer: fmt.Footer, hot: tuple[int, int] | None) -> bytes:
        """The TOC's bytes as stored, unchecked. When the layer's hot frames follow its TOC
        the FUSE process fetches the two by one range request and keeps the frames for the
        layer's warm-up: they arrive right behind the TOC, not a round trip after it."""
        span = fmt.hot_after_toc(footer.toc_offset, footer.toc_size, hot)
        if self.prefetch and span is not None:
            tmp = self.tocs / f".fetch.{os.getpid()}.{threading.get_ident()}.tmp"
            try:
                self.fuse.call("toc", source=self._source(host, repo, digest),
                               toc=[footer.toc_offset, footer.toc_size], hot=list(span),
                               path=str(tmp))
                return tmp.read_bytes()
            except (ControlError, OSError) as exc:  # fetched here then, and its error told
                log.info("TOC not fetched by the FUSE process", extra={"kv": {
                    "layer": digest, "reason": exc}})
            finally:
                tmp.unlink(missing_ok=True)
        return client.read_range(repo, digest, footer.toc_offset, footer.toc_size)

    def _toc_payload(self, client: RegistryClient, host: str, repo: str,
                     desc: dict[str, Any], footer: fmt.Footer) -> bytes:
        """The TOC's bytes, verified: from the head start if it fetched the right ones."""
        digest = desc["digest"]
        with self._lock:
            early = self._toc_bytes.pop((digest, footer.toc_offset, footer.toc_size), None)
        if early is not None:
            try:
                payload = early.result()
                footer.toc_digest.verify(payload, "TOC")
                return payload
            except Exception as exc:  # only a head start: fetch it as the manifest says
                log.info("TOC head start unusable", extra={"kv": {"layer": digest,
                                                                  "reason": exc}})
        payload = self._read_toc(client, host, repo, digest, footer,
                                 fmt.hot_hint(desc.get("annotations") or {}))
        footer.toc_digest.verify(payload, "TOC")
        return payload

    def _fetch_toc(self, client: RegistryClient, host: str, repo: str, desc: dict[str, Any],
                   footer: fmt.Footer, warm: Callable[[Path], None] | None = None) -> None:
        """One range request: the annotations (covered by the manifest digest) locate it.
        `warm` gets the TOC's path while this process checks its chunk table: both parse
        the TOC, on two cores (20 ms for a base layer's). The TOC is kept only if it passes."""
        payload = self._toc_payload(client, host, repo, desc, footer)
        final = self.tocs / footer.toc_digest.hex
        tmp = final.with_name(f".{final.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_bytes(payload)
        warming = threading.Thread(target=warm, args=(tmp,), name="zest-warm") if warm else None
        try:
            try:
                if warming is not None:
                    warming.start()
                tocmod.check_chunk_table(fmt.decode_toc(payload), int(desc["size"]))
            finally:
                if warming is not None and warming.ident is not None:
                    warming.join()  # it reads the file by this name
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        os.replace(tmp, final)

    def _start_toc(self, client: RegistryClient, host: str, repo: str, desc: dict[str, Any],
                   footer: fmt.Footer, profile_job: Future[Profile | None], what: str) -> None:
        """Fetch a later layer's TOC now and, if it has a prefetch list, start on that too."""
        key = footer.toc_digest.hex
        with self._lock:
            if key in self._toc_jobs or (self.tocs / key).exists():
                return

            def job() -> None:
                # the layer's own mount waits for this job, so warm comes before its add
                try:
                    self._fetch_toc(client, host, repo, desc, footer, (lambda path: self._warm(
                        host, repo, desc, footer, profile_job.result(), what, path))
                        if self.prefetch else None)
                finally:
                    with self._lock:
                        self._toc_jobs.pop(key, None)

            self._toc_jobs[key] = self._pool.submit(job)

    def _warm(self, host: str, repo: str, desc: dict[str, Any], footer: fmt.Footer,
              profile: Profile | None, what: str, toc_path: Path) -> None:
        try:
            # where the hot frames lie, from the descriptor: their stream starts before
            # the FUSE process has parsed the TOC that names them
            hot = fmt.hot_hint(desc.get("annotations") or {})
            self.fuse.call("warm", toc_path=str(toc_path), hot=list(hot) if hot else None,
                           toc_digest=str(footer.toc_digest),
                           source=self._source(host, repo, desc["digest"]), what=what,
                           profile=profile.layers.get(desc["digest"], []) if profile else [])
        except ControlError as exc:  # the layer's own prefetch starts at its mount
            log.info("no early prefetch", extra={"kv": {"layer": what, "reason": exc}})

    def _lazy(self, client: RegistryClient, host: str, repo: str, desc: dict[str, Any],
              footer: fmt.Footer, mountpoint: Path, what: str) -> dict[str, Any]:
        digest = desc["digest"]
        toc_file = self.tocs / footer.toc_digest.hex
        with self._lock:
            ahead = self._toc_jobs.get(footer.toc_digest.hex)
        if ahead is not None:
            with contextlib.suppress(Exception):  # on failure, fetch it here and report that
                ahead.result()
        if not toc_file.exists():  # its hot frames start now, not after the mount
            self._fetch_toc(client, host, repo, desc, footer, (lambda path: self._warm(
                host, repo, desc, footer, None, what, path)) if self.prefetch else None)
        sid = int(mountpoint.parent.name)
        return {"kind": "lazy", "name": str(sid), "slot": sid, "toc_path": str(toc_file),
                "toc_digest": str(footer.toc_digest), "what": what,
                "source": self._source(host, repo, digest)}

    def _source(self, host: str, repo: str, digest: str) -> dict[str, Any]:
        """Where the FUSE process reads a layer's blob from."""
        return {"kind": "registry", "host": host, "repo": repo, "digest": digest,
                "plain_http": host in self.plain_http_hosts,
                "hosts_dir": str(self.hosts_dir) if self.hosts_dir else None}

    def _unpack(self, client: RegistryClient, repo: str, manifest: dict[str, Any],
                config: dict[str, Any], index: int, mountpoint: Path,
                what: str) -> dict[str, Any]:
        if not self.unpack:
            raise NotServable(f"{what} is not a zest layer and unpacking is disabled")
        layers = manifest["layers"]
        diff_ids = (config.get("rootfs") or {}).get("diff_ids") or []
        # start every ordinary layer of the image at once; containerd asks for them one by one
        for d in layers[index:]:
            if fmt.ANN_TOC_DIGEST not in (d.get("annotations") or {}):
                self.blobs.start(client, repo, d["digest"], int(d["size"]))
        blob = self.blobs.start(client, repo, layers[index]["digest"],
                                int(layers[index]["size"])).result()
        try:
            unpack_blob(blob, mountpoint, diff_ids[index] if index < len(diff_ids) else None,
                        what)
        except UnpackError:
            for child in mountpoint.iterdir():  # leave an empty directory for containerd
                subprocess.run(["rm", "-rf", "--one-file-system", str(child)], check=False)
            raise
        finally:
            self.blobs.forget(layers[index]["digest"])
        log.info("layer unpacked", extra={"kv": {"layer": what}})
        return {"kind": "unpacked", "what": what}

    def _attach(self, state: dict[str, Any], mountpoint: Path) -> None:
        if state["kind"] != "lazy":
            return
        self.fuse.ensure()
        self.fuse.call("add", name=state["name"], slot=state["slot"],
                       toc_path=state["toc_path"], toc_digest=state["toc_digest"],
                       source=state["source"], what=state["what"],
                       prefetch=self.prefetch,
                       profile=state.get("profile") or [])
        current = _mount_state(mountpoint, self.fuse.cfg.mountpoint)
        if current == "mounted":
            return
        if current == "stale":
            subprocess.run(["umount", "-l", str(mountpoint)], check=False)
        _bind_mount(self.fuse.cfg.mountpoint / state["name"], mountpoint)
        log.info("layer mounted", extra={"kv": {"layer": state["what"], "at": mountpoint}})

    def check(self, mountpoint: Path, labels: Mapping[str, str]) -> None:
        state_path = mountpoint.parent / STATE_FILE
        if not state_path.exists():
            raise Unavailable(f"remote snapshot at {mountpoint} has no state file")
        state = json.loads(state_path.read_text())
        if state["kind"] != "lazy":
            return
        try:
            names = {layer["name"] for layer in self.fuse.call("list")["layers"]}
        except ControlError as exc:
            raise Unavailable(str(exc)) from exc
        if state["name"] not in names or _mount_state(
                mountpoint, self.fuse.cfg.mountpoint) != "mounted":
            raise Unavailable(f"lazy layer {state['what']} is not mounted")

    def unmount(self, mountpoint: Path) -> None:
        state_path = mountpoint.parent / STATE_FILE
        if not state_path.exists():
            return
        state = json.loads(state_path.read_text())
        if state["kind"] != "lazy":
            return
        subprocess.run(["umount", "-l", str(mountpoint)], check=False, capture_output=True)
        try:
            self.fuse.call("remove", name=state["name"])
        except ControlError as exc:
            log.warning("could not remove layer from the FUSE process",
                        extra={"kv": {"layer": state["what"], "error": exc}})
