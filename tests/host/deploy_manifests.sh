#!/usr/bin/env bash
# The Kubernetes manifests in deploy/ validate against the Kubernetes API's schema, offline, in
# strict mode (a misspelt or unknown field is an error, not silently dropped as the API server
# would with its default field validation).
#
#   tests/host/deploy_manifests.sh   prints "ok - NAME" / "not ok - NAME: REASON"; exit 1 on failure
#
# The validator is PyPI's kubernetes-validate, which ships the schemas of each Kubernetes
# release; it lives in a venv under .guest/ (gitignored, where the project caches its test
# tooling), so the host's Python is never touched.
# K8S_VERSION picks the Kubernetes release to validate for; KV_VERSION the validator's version.
set -u

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
# shellcheck source=../guest/lib.sh
. "$REPO/tests/guest/lib.sh"
# 1 install + 1 per manifest in deploy/ (4) + the ConfigMap's plexd config + the misspelt field.
# A new manifest adds one.
plan 7

VENV=${PLEXSTOR_K8S_VENV:-$REPO/.guest/k8s-validate-venv}
KV_VERSION=${KV_VERSION:-1.37.0}
K8S_VERSION=${K8S_VERSION:-1.37.0}
DEPLOY=$REPO/deploy

# ---- kubernetes-validate ----------------------------------------------------------------------
kv_version() { "$VENV/bin/pip" show kubernetes-validate 2>/dev/null | sed -n 's/^Version: //p'; }
if [ "$(kv_version)" != "$KV_VERSION" ]; then
    echo "# installing kubernetes-validate==$KV_VERSION from PyPI into $VENV"
    { python3 -m venv "$VENV" && "$VENV/bin/pip" install -q "kubernetes-validate==$KV_VERSION"; } >&2 ||
        bail "install kubernetes-validate" "pip install kubernetes-validate==$KV_VERSION into $VENV failed"
fi
# The venv is kept between runs: it must hold the version asked for, with that Kubernetes
# release's strict schemas.
installed=$(kv_version)
schemas=$("$VENV/bin/python" -c 'import kubernetes_validate, os; print(os.path.dirname(kubernetes_validate.__file__))' 2>/dev/null)/kubernetes-json-schema
if [ "$installed" = "$KV_VERSION" ] && [ -d "$schemas/v$K8S_VERSION-local-strict" ]; then
    pass "kubernetes-validate $installed installed, with Kubernetes $K8S_VERSION's strict schemas"
else
    bail "kubernetes-validate $KV_VERSION installed" \
        "found version '${installed:-none}' in $VENV; strict schemas for $K8S_VERSION: $(ls -d "$schemas/v$K8S_VERSION-local-strict" 2>&1)"
fi

validate() { "$VENV/bin/kubernetes-validate" --strict --kubernetes-version "$K8S_VERSION" "$@"; }

# ---- every manifest ---------------------------------------------------------------------------
shopt -s nullglob
manifests=("$DEPLOY"/*.yaml "$DEPLOY"/*.yml "$DEPLOY"/*.json)
[ ${#manifests[@]} -gt 0 ] || fail "manifests in deploy/" "none found in $DEPLOY"
for m in "${manifests[@]}"; do
    check "deploy/${m##*/} validates for Kubernetes $K8S_VERSION (strict)" validate "$m"
done

# ---- the ConfigMap holds a configuration plexd can load ---------------------------------------
# plexd -c wants {"subsystems": [{"subsystem": ..., "config": [{"method": ..., "params": {...}}]}]}.
check "deploy/02-configmap.yaml: plexd.json is a plexd configuration with a TCP transport" \
    "$VENV/bin/python" - "$DEPLOY/02-configmap.yaml" <<'PY'
import json, sys, yaml
cm = yaml.safe_load(open(sys.argv[1]))
cfg = json.loads(cm["data"]["plexd.json"])
calls = [c for s in cfg["subsystems"] for c in s["config"]]
assert all(set(s) == {"subsystem", "config"} for s in cfg["subsystems"]), "subsystem entries"
assert all("method" in c and isinstance(c.get("params", {}), dict) for c in calls), "config entries"
tcp = [c for c in calls if c["method"] == "nvmf_create_transport" and c["params"]["trtype"] == "TCP"]
assert tcp, "no nvmf_create_transport with trtype TCP"
PY

# ---- the validator does refuse a misspelt field -----------------------------------------------
# Without --strict it would pass; this keeps the results above meaningful.
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
sed 's/^\( *\)hostNetwork: true/\1hostNetwrok: true/' "$DEPLOY/03-daemonset.yaml" >"$WORK/misspelt.yaml"
out=$(validate "$WORK/misspelt.yaml" 2>&1)
rc=$?
if ! grep -q hostNetwrok "$WORK/misspelt.yaml"; then
    fail "a misspelt field is refused" "could not misspell hostNetwork in a copy of 03-daemonset.yaml"
elif [ "$rc" != 0 ] && printf '%s' "$out" | grep -q "'hostNetwrok'"; then
    pass "a misspelt field (hostNetwrok) is refused"
else
    printf '%s\n' "$out" | tail -n 5 | sed 's/^/# /'
    fail "a misspelt field is refused" "exit $rc"
fi

finish
