"""The container image as the Dockerfile's run stage describes it, shared by scripts/check-image
(which builds an OCI image of it) and scripts/pod-emulate (which runs a pod on it):

  - read_dockerfile: the run stage's ENTRYPOINT, CMD, USER, WORKDIR, EXPOSE, LABEL and ARG, and
    where it COPYs the binary; an instruction this file does not mirror is an error, so the
    emulated image cannot drift from the Dockerfile silently;
  - contents: what the image holds beside the binary. The Dockerfile's base is
    gcr.io/distroless/cc-debian12:nonroot; here its part that leaderlink needs is taken from
    this machine: the shared libraries `ldd` names (and the loader) at their paths, the CA
    bundle, distroless's passwd/group (root, nobody, nonroot 65532) and nsswitch.conf,
    /home/nonroot and /tmp. A binary that needs a newer glibc than this machine's passes here
    and may fail on distroless; distroless also holds what leaderlink does not use (libssl,
    libstdc++, tzdata, ...);
  - BASE_ENV, BASE_WORKDIR: what distroless's image config sets (the stage's env and workdir
    unless it says otherwise).

Command line (for the shell scripts):
  python3 scripts/image_root.py stage DOCKERFILE              the run stage as JSON
  python3 scripts/image_root.py populate DOCKERFILE BIN ROOT  the image's files written under ROOT
                                                              (as root: owners kept); prints the
                                                              libraries, one per line
"""
import json
import os
import re
import shlex
import shutil
import subprocess
import sys

BASE_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "SSL_CERT_FILE": "/etc/ssl/certs/ca-certificates.crt",
}
BASE_WORKDIR = "/home/nonroot"
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
PASSWD = ("root:x:0:0:root:/root:/sbin/nologin\n"
          "nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\n"
          "nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n")
GROUP = "root:x:0:\nnobody:x:65534:\nnonroot:x:65532:\n"
NSSWITCH = ("passwd: files\ngroup: files\nshadow: files\nhosts: files dns\nnetworks: files\n"
            "protocols: files\nservices: files\n")
NONROOT = 65532


class ImageError(Exception):
    """The Dockerfile or the binary cannot be turned into the image."""


def read_dockerfile(path):
    """The Dockerfile's run stage (its last): from, args, labels, expose, user, workdir, env
    (the base image's), entrypoint, cmd (exec form), and `binary`, the path its one COPY puts the
    binary at."""
    text = re.sub(r"\\\n", " ", open(path).read())
    stages = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        if word.upper() == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((word.upper(), rest.strip()))
    if not stages:
        raise ImageError(f"{path}: no FROM")
    stage = {"from": stages[-1][0][1], "args": {}, "labels": {}, "expose": [], "user": "0",
             "workdir": BASE_WORKDIR, "env": dict(BASE_ENV), "copy": None}

    def subst(s):
        return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: stage["args"].get(m[1] or m[2], ""), s)

    for word, rest in stages[-1][1:]:
        if word == "ARG":
            name, _, default = rest.partition("=")
            stage["args"][name] = default
        elif word == "LABEL":
            for kv in shlex.split(subst(rest)):
                k, _, v = kv.partition("=")
                stage["labels"][k] = v
        elif word == "COPY":
            if stage["copy"] is not None:
                raise ImageError(f"{path}: the run stage should COPY one file (the binary)")
            stage["copy"] = [a for a in rest.split() if not a.startswith("--")]
        elif word == "USER":
            stage["user"] = rest
        elif word == "WORKDIR":
            stage["workdir"] = rest
        elif word == "EXPOSE":
            stage["expose"] += [p if "/" in p else p + "/tcp" for p in rest.split()]
        elif word in ("ENTRYPOINT", "CMD"):
            # The exec form only: the shell form would need a shell, which distroless has not.
            if not rest.startswith("["):
                raise ImageError(f"{path}: {word} is not in exec form")
            stage[word.lower()] = json.loads(rest)
        else:
            raise ImageError(f"{path}: the run stage has {word}, which scripts/image_root.py "
                             "does not mirror")
    for key in ("copy", "entrypoint", "cmd"):
        if stage.get(key) is None:
            raise ImageError(f"{path}: the run stage has no {key.upper()}")
    if len(stage["copy"]) != 2:
        raise ImageError(f"{path}: the run stage should COPY one file (the binary)")
    stage["binary"] = stage.pop("copy")[1]
    if os.path.basename(stage["binary"]) != os.path.basename(stage["entrypoint"][0]):
        raise ImageError(f"{path}: ENTRYPOINT {stage['entrypoint'][0]} is not the binary COPY "
                         f"puts at {stage['binary']}")
    return stage


def shared_libraries(binary):
    """The shared libraries (and the loader) the binary needs, as `ldd` names them; none for a
    static binary."""
    out = subprocess.run(["ldd", binary], capture_output=True, text=True)
    if out.returncode != 0:
        if "not a dynamic executable" in out.stdout + out.stderr:
            return []
        raise ImageError(f"ldd {binary}: {out.stdout}{out.stderr}")
    if "not found" in out.stdout:
        raise ImageError(f"ldd {binary}: a library is missing on this machine:\n{out.stdout}")
    libs = []
    # "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)", "/lib64/ld-linux-x86-64.so.2
    # (0x...)"; linux-vdso has no file.
    for line in out.stdout.splitlines():
        m = re.search(r"(/\S+) \(0x", line)
        if m and m.group(1) not in libs:
            libs.append(m.group(1))
    return libs


def contents(binary, stage):
    """The image's files: (kind, source, path, mode, owner) with kind "file" (a host file copied
    or bound, symlinks resolved), "text" (source is the content) or "dir"; owner is a uid (its
    gid the same) or None for root."""
    items = [("file", binary, stage["binary"], 0o755, None)]
    items += [("file", lib, lib, 0o755, None) for lib in shared_libraries(binary)]
    if not os.path.exists(CA_BUNDLE):
        raise ImageError(f"no {CA_BUNDLE} here (Debian: apt-get install ca-certificates)")
    items += [
        ("file", CA_BUNDLE, CA_BUNDLE, 0o644, None),
        ("text", PASSWD, "/etc/passwd", 0o644, None),
        ("text", GROUP, "/etc/group", 0o644, None),
        ("text", NSSWITCH, "/etc/nsswitch.conf", 0o644, None),
        ("dir", None, BASE_WORKDIR, 0o700, NONROOT),
        ("dir", None, "/tmp", 0o1777, None),
    ]
    return items


def populate(binary, stage, root):
    """Writes the image's files under `root`; returns the libraries."""
    items = contents(binary, stage)
    for kind, source, path, mode, owner in items:
        target = root + path
        if kind == "dir":
            os.makedirs(target, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            if kind == "file":
                shutil.copyfile(source, target)
            else:
                open(target, "w").write(source)
        os.chmod(target, mode)
        if owner is not None:
            os.chown(target, owner, owner)
    return [p for k, _, p, _, _ in items if k == "file" and p not in (stage["binary"], CA_BUNDLE)]


def main():
    try:
        if len(sys.argv) == 3 and sys.argv[1] == "stage":
            json.dump(read_dockerfile(sys.argv[2]), sys.stdout)
        elif len(sys.argv) == 5 and sys.argv[1] == "populate":
            for lib in populate(sys.argv[3], read_dockerfile(sys.argv[2]), sys.argv[4]):
                print(lib)
        else:
            sys.exit(__doc__)
    except ImageError as e:
        sys.exit(str(e))


if __name__ == "__main__":
    main()
