#!/usr/bin/env bash
# Build the lowmem-train image from docker/Dockerfile (one Dockerfile; the build args differ).
#
#   docker/build.sh            lowmem-train:cuda  CUDA devel base + CUDA torch (needs a reachable image registry)
#   docker/build.sh --cpu      lowmem-train:cpu   a local Debian bookworm base + the CPU torch wheel of this host
#   docker/build.sh --cpu --tag NAME:TAG [-- extra docker build arguments, e.g. --no-cache]
#
# --cpu, on a machine that reaches package registries but no image registry:
#   - the base image (lowmem-train-base:bookworm-<hash of its package list>) is made once with debootstrap from
#     the Debian mirror apt already uses (DEBIAN_MIRROR overrides) and `docker import`ed; it is the cache: it is
#     made again only when it is missing or its package list changes (needs root and debootstrap);
#   - the CPU torch wheel is copied into the build context (docker/wheels/) with `pip download`, from wherever
#     this host's pip finds torch==VERSION+cpu (a local wheel, or PIP_EXTRA_INDEX_URL=.../whl/cpu).
# Both: the CA bundle pip uses here (`pip config list`'s cert, PIP_CERT, else the system bundle) is passed as a
# BuildKit secret, so pip inside the build trusts what pip here trusts; it never lands in a layer.
# Environment: DOCKER (the docker client), PYTHON (the host Python whose pip downloads the wheel).
# Exit codes: 0 built, 4 this machine cannot build (no engine, no BuildKit client, no root or debootstrap for
# the base image: the message says which), anything else a failed build.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")
variant=cuda
tag=""
extra=()
while [ "$#" -gt 0 ]; do
    case $1 in
        --cpu) variant=cpu ;;
        --cuda) variant=cuda ;;
        --tag) tag=$2; shift ;;
        --) shift; extra=("$@"); break ;;
        -h | --help) sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "build.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
tag=${tag:-lowmem-train:$variant}
python=${PYTHON:-python3}
torch_version=$(sed -n 's/^torch==//p' "$here/constraints.txt")
[ -n "$torch_version" ] || { echo "build.sh: no torch pin in docker/constraints.txt" >&2; exit 2; }

say() { printf '%s build.sh: %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

# A client that builds with BuildKit (RUN --mount): one with the buildx plugin, or a pre-23 client, whose
# `DOCKER_BUILDKIT=1 docker build` uses the engine's built-in BuildKit (Debian's docker.io package ships one).
pick_client() {
    local candidate major
    for candidate in ${DOCKER:-} $(type -ap docker) /usr/bin/docker; do
        [ -x "$candidate" ] || continue
        if "$candidate" buildx version >/dev/null 2>&1; then
            echo "$candidate"
            return 0
        fi
        major=$("$candidate" version --format '{{.Client.Version}}' 2>/dev/null || true)
        major=${major%%.*}
        if [[ $major =~ ^[0-9]+$ ]] && [ "$major" -lt 23 ]; then
            echo "$candidate"
            return 0
        fi
    done
    return 1
}
cannot() { echo "build.sh: $*" >&2; exit 4; }
docker=$(pick_client) || cannot "no docker client that builds with BuildKit (install the buildx plugin)"
"$docker" info >/dev/null 2>&1 || cannot "the Docker engine does not answer ($docker info)"

# The CA bundle this host's pip trusts.
ca_bundle() {
    local cert
    cert=$("$python" -m pip config list 2>/dev/null | sed -n "s/^global\.cert='\(.*\)'$/\1/p" | head -n 1)
    cert=${cert:-${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}}
    if [ -f "$cert" ]; then echo "$cert"; fi
}

# The first Debian mirror apt uses here for bookworm (deb822 .sources or one-line .list files).
debian_mirror() {
    if [ -n "${DEBIAN_MIRROR:-}" ]; then
        echo "$DEBIAN_MIRROR"
        return
    fi
    local file uri=""
    for file in /etc/apt/sources.list.d/*.sources; do
        [ -f "$file" ] || continue
        uri=$(awk 'BEGIN{RS=""} /Suites:[^\n]*bookworm( |\n|$)/ && /debian/ {
                 if (match($0, /URIs:[ \t]*[^ \t\n]+/)) { s = substr($0, RSTART, RLENGTH); sub(/URIs:[ \t]*/, "", s); print s; exit } }' "$file")
        [ -z "$uri" ] || break
    done
    if [ -z "$uri" ]; then
        uri=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
            awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i !~ /^\[/ && $i !~ /\]$/) { if ($(i+1) == "bookworm") { print $i; exit } break } }')
    fi
    echo "${uri:-http://deb.debian.org/debian}"
}

base_packages="python3,python3-venv,python3-dev,g++,tini,ca-certificates"
make_base() {  # make_base IMAGE: debootstrap a minimal bookworm with what the Dockerfile needs, docker import it
    local image=$1 mirror rootfs
    command -v debootstrap >/dev/null || cannot "the base image $image is missing and debootstrap is not installed"
    [ "$(id -u)" = 0 ] || cannot "the base image $image is missing and making it (debootstrap) needs root"
    mirror=$(debian_mirror)
    rootfs=$(mktemp -d "${TMPDIR:-/var/tmp}/lowmem-rootfs.XXXXXX")
    # shellcheck disable=SC2064  # expand now: the path is fixed
    trap "rm -rf '$rootfs'" EXIT
    say "making the base image $image: debootstrap bookworm from $mirror (about a minute)"
    debootstrap --variant=minbase --include="$base_packages" bookworm "$rootfs" "$mirror" >"$rootfs.log" 2>&1 || {
        tail -n 30 "$rootfs.log" >&2
        echo "build.sh: debootstrap failed (log above)" >&2
        exit 1
    }
    rm -f "$rootfs.log"
    # What a container never needs: the downloaded .debs, apt's lists, documentation.
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
        "$rootfs"/usr/share/man "$rootfs"/usr/share/info
    find "$rootfs/usr/share/doc" -type f ! -name copyright -delete
    tar -C "$rootfs" -c . | "$docker" import \
        --change 'ENV LANG=C.UTF-8' \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'CMD ["/bin/bash"]' - "$image" >/dev/null
    rm -rf "$rootfs"
    trap - EXIT
    say "base image $image ready"
}

args=()
if [ "$variant" = cpu ]; then
    base="lowmem-train-base:bookworm-$(printf '%s' "$base_packages" | cksum | cut -d' ' -f1)"
    if "$docker" image inspect "$base" >/dev/null 2>&1; then
        say "base image $base: present"
    else
        make_base "$base"
    fi
    # The CPU wheel into the build context (pip skips the copy when the same file is already there).
    wheel_version="${torch_version}+cpu"
    "$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.11 \
        -d "$here/wheels" "torch==$wheel_version"
    find "$here/wheels" -name 'torch-*.whl' ! -name "torch-${wheel_version}-*" -delete
    args+=(--build-arg "BASE_IMAGE=$base" --build-arg "TORCH_VERSION=$wheel_version"
        --build-arg "TORCH_INDEX_URL=" --build-arg "DS_ACCELERATOR=cpu")
else
    # No wheel in the context: torch comes from TORCH_INDEX_URL (the Dockerfile's default, CUDA).
    find "$here/wheels" -name 'torch-*.whl' -delete
fi

cert=$(ca_bundle)
if [ -n "$cert" ]; then args+=(--secret "id=pip_ca,src=$cert"); fi

say "building $tag with $docker (BuildKit)"
start=$(date +%s)
DOCKER_BUILDKIT=1 "$docker" build --progress=plain -f "$here/Dockerfile" -t "$tag" \
    "${args[@]}" "${extra[@]}" "$repo"
say "built $tag in $(($(date +%s) - start)) s"
