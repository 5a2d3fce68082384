# shellcheck shell=bash
# Sourced by end-to-end scripts (after tests/e2e/common.sh and lab_init): the test OpenID
# provider (provider.mjs) in a lab host, with a throw-away CA, signing keys, users, a client
# secret and an admin token. Not a test on its own.
#
#   idp_prepare HOST USERS_JSON   # sets IDP_IP, IDP_DIR, ISSUER, IDP_CA; writes the files;
#                                 # exports OIDC_CLIENT_SECRET, OIDC_ADMIN_TOKEN, OIDC_ADMIN_URL
#   idp_start HOST [provider.mjs flags...]   # starts it (client id `ward`), waits until ready;
#                                            # sets IDP_PID
#   idp_rp_args                    # prints the coordinator's --oidc-* flags for this provider
OIDC="$(lab_repo_root)/tests/oidc"

idp_prepare() {
    local host=${1:?usage: idp_prepare HOST USERS_JSON} users=${2:?usage: idp_prepare HOST USERS_JSON}
    command -v node >/dev/null || return 1
    [[ -d "$OIDC/node_modules" ]] || (cd "$OIDC" && npm ci --no-audit --no-fund >/dev/null 2>&1) || return 1
    IDP_IP=$(lab_ip "$host")
    IDP_DIR="$LAB_DIR/idp-$host"
    ISSUER="https://$IDP_IP"
    IDP_CA="$IDP_DIR/ca.pem"
    mkdir -p "$IDP_DIR"
    "$OIDC/mkcert.sh" "$IDP_DIR" "$IDP_IP" >/dev/null 2>&1 || return 1
    node "$OIDC/genjwks.mjs" "$IDP_DIR/jwks.json" >/dev/null || return 1
    printf '%s\n' "$users" >"$IDP_DIR/users.json"
    export OIDC_CLIENT_SECRET="cs-$RANDOM$RANDOM" OIDC_ADMIN_TOKEN="adm-$RANDOM$RANDOM"
    export OIDC_ADMIN_URL=http://127.0.0.1:9444
    printf '%s\n' "$OIDC_CLIENT_SECRET" >"$IDP_DIR/client-secret"
    chmod 600 "$IDP_DIR/client-secret"
}

idp_start() {
    local host=${1:?usage: idp_start HOST [FLAGS...]}
    shift
    lab_spawn "$host" "idp-$host.log" node "$OIDC/provider.mjs" --issuer "$ISSUER" \
        --tls-cert "$IDP_DIR/server.pem" --tls-key "$IDP_DIR/server.key" --jwks "$IDP_DIR/jwks.json" \
        --users "$IDP_DIR/users.json" --client-id ward --admin-listen 127.0.0.1:9444 "$@"
    IDP_PID=$(lab_last_pid)
    lab_wait_for -t 30 lab_exec "$host" python3 "$OIDC/admin.py" wait --timeout 1
}

idp_rp_args() {
    echo "--oidc-issuer $ISSUER --oidc-client-id ward --oidc-client-secret-file $IDP_DIR/client-secret --oidc-ca-file $IDP_CA"
}
