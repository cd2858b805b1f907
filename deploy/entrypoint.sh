#!/bin/sh
# The container's command (deploy/Dockerfile): serve the image's model store with the shipped
# config.properties, in the foreground, as the image's non-root user.
#
# The shipped config listens on loopback. In a container the inference API and the metrics must be
# reachable from outside, so this writes the running config, $YOLO_RUN_DIR/config.properties, as the
# shipped file with only the listening addresses changed:
#   inference  http://$YOLO_BIND_ADDRESS:$YOLO_INFERENCE_PORT   (0.0.0.0:8080)
#   metrics    http://$YOLO_BIND_ADDRESS:$YOLO_METRICS_PORT     (0.0.0.0:8082, Prometheus)
#   management http://127.0.0.1:$YOLO_MANAGEMENT_PORT           (8081, loopback: only deploy/ready.py uses it)
#   gRPC       127.0.0.1:$YOLO_GRPC_INFERENCE_PORT / $YOLO_GRPC_MANAGEMENT_PORT (7070 / 7071, loopback)
# Everything else (token authorization ON, model API off, size limits, metrics) is the shipped file.
# YOLO_DISABLE_TOKEN_AUTH=true turns token authorization off (Kubernetes behind a NetworkPolicy:
# docs/deploy.md says why); the image default keeps it on.
#
# TorchServe runs in $YOLO_RUN_DIR (key_file.json lands there), with TMPDIR/TEMP (its PID file, the
# unpacked archive) and its logs below it: the only directory it writes, so the root filesystem can
# be read-only. Extra arguments go to torchserve.
set -eu

: "${YOLO_HOME:=/opt/yolo}"
: "${YOLO_CONFIG:=$YOLO_HOME/config.properties}"
: "${YOLO_MODEL_STORE:=$YOLO_HOME/model-store}"
: "${YOLO_RUN_DIR:=/srv/yolo}"
: "${YOLO_BIND_ADDRESS:=0.0.0.0}"
: "${YOLO_INFERENCE_PORT:=8080}"
: "${YOLO_MANAGEMENT_PORT:=8081}"
: "${YOLO_METRICS_PORT:=8082}"
: "${YOLO_GRPC_INFERENCE_PORT:=7070}"
: "${YOLO_GRPC_MANAGEMENT_PORT:=7071}"
: "${YOLO_DISABLE_TOKEN_AUTH:=false}"

die() { echo "entrypoint: $*" >&2; exit 64; }

[ -f "$YOLO_CONFIG" ] || die "no config at YOLO_CONFIG=$YOLO_CONFIG"
[ -d "$YOLO_MODEL_STORE" ] || die "no model store at YOLO_MODEL_STORE=$YOLO_MODEL_STORE"
ls "$YOLO_MODEL_STORE"/*.mar >/dev/null 2>&1 || die "no .mar in $YOLO_MODEL_STORE"
for key in inference_address management_address metrics_address grpc_inference_address \
    grpc_management_address grpc_inference_port grpc_management_port; do
    [ "$(grep -c "^$key=" "$YOLO_CONFIG")" = 1 ] || die "$YOLO_CONFIG must set $key exactly once"
done
case "$YOLO_DISABLE_TOKEN_AUTH" in true | false) ;; *) die "YOLO_DISABLE_TOKEN_AUTH must be true or false" ;; esac

mkdir -p "$YOLO_RUN_DIR/tmp" "$YOLO_RUN_DIR/logs"
export TMPDIR="$YOLO_RUN_DIR/tmp" TEMP="$YOLO_RUN_DIR/tmp"
export LOG_LOCATION="$YOLO_RUN_DIR/logs" METRICS_LOCATION="$YOLO_RUN_DIR/logs"
unset TS_CONFIG_FILE  # it would override --ts-config

running="$YOLO_RUN_DIR/config.properties"
sed -e "s|^inference_address=.*|inference_address=http://$YOLO_BIND_ADDRESS:$YOLO_INFERENCE_PORT|" \
    -e "s|^management_address=.*|management_address=http://127.0.0.1:$YOLO_MANAGEMENT_PORT|" \
    -e "s|^metrics_address=.*|metrics_address=http://$YOLO_BIND_ADDRESS:$YOLO_METRICS_PORT|" \
    -e "s|^grpc_inference_address=.*|grpc_inference_address=127.0.0.1|" \
    -e "s|^grpc_management_address=.*|grpc_management_address=127.0.0.1|" \
    -e "s|^grpc_inference_port=.*|grpc_inference_port=$YOLO_GRPC_INFERENCE_PORT|" \
    -e "s|^grpc_management_port=.*|grpc_management_port=$YOLO_GRPC_MANAGEMENT_PORT|" \
    -e "/^disable_token_authorization=/d" \
    "$YOLO_CONFIG" >"$running"
printf '\n# deploy/entrypoint.sh\ndisable_token_authorization=%s\n' "$YOLO_DISABLE_TOKEN_AUTH" >>"$running"

cd "$YOLO_RUN_DIR"
echo "entrypoint: torchserve --foreground --ncs --ts-config $running --model-store $YOLO_MODEL_STORE $*" >&2
exec torchserve --foreground --ncs --ts-config "$running" --model-store "$YOLO_MODEL_STORE" "$@"
