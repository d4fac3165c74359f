#!/usr/bin/env bash
# Records the cilia-k8s test fixtures from a real Kubernetes API server
# (1.28 or newer): creates the fixtures' objects, saves what the API server
# returns (`kubectl get --raw`, the exact wire format) and removes them again.
#
#   scripts/k8s-record-fixtures.sh [--out DIR] [--node NODE]
#
# Uses kubectl's current context (KUBECONFIG); talks to nothing else. Takes
# about two minutes (it waits for a watch bookmark). Objects go into a
# namespace of their own (cilia-fixtures-PID) and one clusterwide policy. Not run by the tests:
# see crates/cilia-k8s/tests/fixtures/README.md for what to do with the output.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
out="$root/target/k8s-fixtures"
node=""
while [ $# -gt 0 ]; do
    case "$1" in
    --out) out="$2"; shift 2 ;;
    --node) node="$2"; shift 2 ;;
    -h | --help) sed -n '2,11p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
done

command -v kubectl >/dev/null || { echo "kubectl is not installed" >&2; exit 1; }
kubectl version -o json >/dev/null || { echo "no API server reachable through kubectl's current context" >&2; exit 1; }
minor="$(kubectl version -o json | python3 -c 'import json,sys; v=json.load(sys.stdin)["serverVersion"]; print(int("".join(c for c in v["minor"] if c.isdigit())))')"
if [ "$minor" -lt 28 ]; then
    echo "the API server is 1.$minor; the fixtures are for 1.28 or newer" >&2
    exit 1
fi
[ -n "$node" ] || node="$(kubectl get nodes -o jsonpath='{.items[0].metadata.name}')"
ns="cilia-fixtures-$$"
mkdir -p "$out"
watchers=()

cleanup() {
    for pid in "${watchers[@]}"; do kill "$pid" 2>/dev/null || true; done
    kubectl delete namespace "$ns" --ignore-not-found --wait=false >/dev/null 2>&1 || true
    kubectl delete ccnp allow-host-and-deny-world --ignore-not-found >/dev/null 2>&1 || true
}
trap cleanup EXIT

raw() { kubectl get --raw "$1"; }

echo "recording into $out (namespace $ns, node $node)"
kubectl apply -f "$root/install/kubernetes/crds/" >/dev/null
kubectl wait --for=condition=Established crd/ciliumnetworkpolicies.cilium.io \
    crd/ciliumclusterwidenetworkpolicies.cilium.io --timeout=60s >/dev/null
kubectl create namespace "$ns" >/dev/null
kubectl label namespace "$ns" team=empire >/dev/null

pod() { # name, labels (JSON object), service account
    kubectl -n "$ns" create -f - >/dev/null <<JSON
{"apiVersion": "v1", "kind": "Pod",
 "metadata": {"name": "$1", "labels": $2},
 "spec": {"nodeName": "$node", "serviceAccountName": "$3", "automountServiceAccountToken": false,
  "containers": [{"name": "main", "image": "registry.k8s.io/pause:3.9",
    "ports": [{"name": "http", "containerPort": 80, "protocol": "TCP"}, {"containerPort": 9090}]},
   {"name": "metrics", "image": "registry.k8s.io/pause:3.9",
    "ports": [{"name": "metrics", "containerPort": 9100}, {"name": "dns", "containerPort": 53, "protocol": "UDP"}]}]}}
JSON
}
kubectl -n "$ns" create serviceaccount deathstar >/dev/null
pod deathstar '{"class": "deathstar", "org": "empire", "app.kubernetes.io/name": "deathstar", "pod-template-hash": "6fb5694d48"}' deathstar
pod tiefighter '{"class": "tiefighter", "org": "empire"}' default
pod xwing '{"class": "xwing", "org": "alliance"}' default

raw "/api/v1/namespaces/$ns/pods/deathstar" >"$out/pod-deathstar.json"
raw "/api/v1/namespaces/$ns" >"$out/namespace-default.json"
raw "/api/v1/namespaces/$ns/pods?fieldSelector=spec.nodeName%3D$node" >"$out/pods-list.json"
rv="$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["metadata"]["resourceVersion"])' "$out/pods-list.json")"

# A watch from the list's version: label change, add, delete, and (within
# about a minute) a bookmark.
kubectl get --raw "/api/v1/namespaces/$ns/pods?watch=1&allowWatchBookmarks=true&resourceVersion=$rv&fieldSelector=spec.nodeName%3D$node&timeoutSeconds=90" \
    >"$out/watch-pods.jsonl" &
watchers+=("$!")
sleep 2
kubectl -n "$ns" label pod tiefighter org=alliance --overwrite >/dev/null
pod xwing-2 '{"class": "xwing", "org": "alliance"}' default
kubectl -n "$ns" delete pod xwing --grace-period=0 --force >/dev/null 2>&1
wait "${watchers[0]}" || true
watchers=()

# An expired version: a watch from resourceVersion 1 is refused with an
# ERROR event (410 Expired) on servers whose history was compacted.
raw "/api/v1/namespaces/$ns/pods?watch=1&resourceVersion=1&timeoutSeconds=5" \
    >"$out/watch-pods-expired.jsonl" || true
raw "/api/v1/namespaces/$ns/pods?fieldSelector=spec.nodeName%3D$node" >"$out/pods-relist.json"

kubectl -n "$ns" apply -f "$root/examples/starwars/networkpolicy-l3-l4.yaml" >/dev/null
raw "/apis/networking.k8s.io/v1/namespaces/$ns/networkpolicies/rule1-np" >"$out/networkpolicy-rule1-np.json"
cnp_rv="$(kubectl get --raw "/apis/cilium.io/v2/namespaces/$ns/ciliumnetworkpolicies" |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["metadata"]["resourceVersion"])')"
kubectl get --raw "/apis/cilium.io/v2/namespaces/$ns/ciliumnetworkpolicies?watch=1&allowWatchBookmarks=true&resourceVersion=$cnp_rv&timeoutSeconds=20" \
    >"$out/watch-cnp.jsonl" &
watchers+=("$!")
sleep 2
kubectl -n "$ns" apply -f "$root/examples/starwars/cnp-l3-l4.yaml" >/dev/null
kubectl -n "$ns" apply -f - >/dev/null <<'YAML'
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: to-fqdn
spec:
  endpointSelector: {matchLabels: {class: xwing}}
  egress:
  - toFQDNs: [{matchName: rebels.example.org}]
YAML
raw "/apis/cilium.io/v2/namespaces/$ns/ciliumnetworkpolicies/rule1" >"$out/cnp-rule1.json"
raw "/apis/cilium.io/v2/namespaces/$ns/ciliumnetworkpolicies/to-fqdn" >"$out/cnp-unsupported.json"
kubectl -n "$ns" delete cnp rule1 >/dev/null
wait "${watchers[0]}" || true
watchers=()

kubectl apply -f - >/dev/null <<'YAML'
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata:
  name: allow-host-and-deny-world
spec:
  endpointSelector: {}
  ingress:
  - fromEntities: [host]
  ingressDeny:
  - fromEntities: [world]
    toPorts: [{ports: [{port: "22", protocol: TCP}]}]
YAML
raw "/apis/cilium.io/v2/ciliumclusterwidenetworkpolicies/allow-host-and-deny-world" >"$out/ccnp-host-ingress.json"

echo "recorded:"
ls -l "$out"
