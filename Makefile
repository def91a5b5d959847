# skiff: build the app image, test, run locally, and manage this branch's stack and releases.
# `make` alone lists the targets. Every variable below can be set on the command line
# (`make push REGISTRY=127.0.0.1:5000`) or in the environment.
#
# Variables and their defaults:
#   REGION       AWS region                        $AWS_REGION, else $AWS_DEFAULT_REGION, else us-east-1
#   BRANCH       git branch                        $BRANCH_NAME (Jenkins), else the checked-out branch
#   ENV          environment of BRANCH             BRANCH when it is already lowercase [a-z0-9-], at most
#                40 characters; else BRANCH sanitized (lowercased, runs of other characters -> -, cut
#                to 32) + '--' + 6 hex of sha256(BRANCH): feature/Login -> feature-login--<hash>.
#                No two branches share an environment ('--' is never in a sanitized name), and
#                a branch whose environment or sanitized name is PROTECTED but which is not
#                exactly that name (Master, master_, -master, Production) is refused by every
#                target that acts on the branch; `make -s env-name` prints ENV or refuses
#   STACK        the branch's CloudFormation stack app-$(ENV)
#   HASH         image tag naming the commit       git rev-parse --short HEAD (CI passes the full hash)
#   REPOSITORY   image repository name             skiff-app
#   REGISTRY     registry to push to               empty: this account's ECR in REGION (asked of STS)
#   IMAGE        image name, without tag           $(REGISTRY)/$(REPOSITORY), or $(REPOSITORY) if no REGISTRY
#   BASE         base image for app/Dockerfile     empty: the Dockerfile's own default
#   ALLOW_DIRTY  1 to build from a modified app/   empty: refuse (the hash tag would lie)
#   TAG          release to ship (update-stack)    required, e.g. TAG=$$(git rev-parse --short HEAD)
#   CTL          the ctl binary                    ctl on PATH, else $(CARGO_TARGET_DIR)/release/ctl
#   CTL_FLAGS    more `ctl release` options        empty; e.g. CTL_FLAGS=--dry-run, CTL_FLAGS='--no-wait --json'
#   SKIFF_PARAMETER SKIFF_ASG SKIFF_IMAGE (environment): when all three are set, update-stack passes
#                no stack to ctl, which then uses these instead of STACK's outputs
#   AGENT_BIN    agent binary baked into the AMI   $(CARGO_TARGET_DIR)/release/agent
#   CARGO_TARGET_DIR                               /root/.cache/skiff-target
#   AWS          the AWS CLI                       aws
#   create-stack only (needed when the stack does not exist yet; kept from before otherwise):
#   VPC_ID PUBLIC_SUBNETS PRIVATE_SUBNETS (comma-separated) CERTIFICATE_ARN AMI_ID
#   MIN_SIZE MAX_SIZE INSTANCE_TYPE (optional)
#   TEMPLATE_BUCKET an S3 bucket of the account: needed while templates/app.yaml is over the 51,200
#                bytes CloudFormation takes inline (deploy uploads it under skiff-templates/$(ENV)/;
#                delete-stack removes that prefix)
#   Shared load balancer (optional, QA; then no CERTIFICATE_ARN; templates/README.md):
#   SHARED_LISTENER_ARN SHARED_LB_SECURITY_GROUP LISTENER_RULE_PRIORITY, and SITE_HOST_NAME
#                (default $(ENV).$(SITE_DOMAIN) when SITE_DOMAIN is set)
#   Database (optional; default: the stack creates its own RDS MySQL instance):
#   DATABASE_HOST DATABASE_PORT DATABASE_NAME DATABASE_SECRET_ARN DATABASE_CLIENTS_SECURITY_GROUP
#                an existing database instead (templates/README.md, "Sharing a database");
#                DATABASE_SECURITY_GROUP is deprecated (the move from it: same section), none clears it
#   DATABASE_MULTI_AZ DATABASE_DELETION_PROTECTION ("true"/"false") the own database's settings
#   CTL_EXIT_FILE update-stack writes ctl's exit code there (make itself exits 2 on any failure)
#   TRUSTED_KEYS a file of PEM public keys (-----BEGIN PUBLIC KEY----- blocks, P-256; several while
#                a key is rotated). create-stack: the stack's TrustedKeys (kept in
#                /skiff/$(ENV)/trusted-keys; the hosts then run only images signed by one of them);
#                empty: the stack keeps the keys it has (none for a new stack: checks off).
#                update-stack: ctl --trusted-keys (ctl checks the release against them instead of
#                the stack's). A file holding no public key, or a private key, is refused
#   sign only (after push; Jenkins' Sign stage): one of
#   SIGNING_KEY  a PEM PKCS#8 P-256 private key file (Jenkins: the skiff-signing-key file credential)
#   SIGNING_KMS_KEY an asymmetric KMS key (ECC_NIST_P256, SIGN_VERIFY; ctl calls kms:Sign only), with
#   SIGNING_PUBLIC_KEY its public key (PEM) to check the signature read back
#                the image signed: $$SKIFF_IMAGE, else $(REGISTRY)/$(REPOSITORY) as push names it
#   integration only (app/integration.py; README "Branch environments"):
#   URL          the deployment to check           empty: https://<the stack's LoadBalancerDNS>
#   EXPECT_TAG   the release it must run           $(HASH)
#   WAIT         retry window, seconds             120 (a new stack: its instances boot first)
#   MIN_HOSTS    different hosts that must answer  1
#   SERVER_NAME  TLS name and Host header          $(ENV).$(SITE_DOMAIN) when SITE_DOMAIN is set, else URL's host
#   SITE_DOMAIN  the branch sites' domain (a wildcard certificate *.SITE_DOMAIN on the listeners)
#   CA INSECURE  a private CA's PEM file, or 1 to skip certificate verification
#   delete-stack only:
#   FORCE        1: no question asked              empty: asks on a terminal, refuses without one
#   PROTECTED    protected environments            master main production prod
#                only the branch of exactly that name reaches one; FORCE=1 cannot delete one;
#                create-stack and update-stack reach one other than master only with CONFIRM_PROTECTED
#   CONFIRM_PROTECTED  =<ENV> to delete a protected one anyway (or deploy one other than master)
#   DELETE_TIMEOUT     seconds to wait for the stack's deletion   3600

SHELL := bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help
MAKEFLAGS += --no-print-directory

REGION ?= $(or $(AWS_REGION),$(AWS_DEFAULT_REGION),us-east-1)
BRANCH ?= $(or $(BRANCH_NAME),$(shell git rev-parse --abbrev-ref HEAD 2>/dev/null))
# The environment of a branch, valid in a stack name, a parameter path, a tag and a host name.
# BRANCH_BASE: BRANCH lowercased, runs of other characters -> '-', no '-' at either end (empty
# when it has no letter or digit). A branch that is exactly its BRANCH_BASE (and at most 40
# characters) is its own environment; any other gets its base cut to 32 characters, '--' and 6 hex
# of the raw name's sha256: Master, MASTER and master_ are three environments, none of them
# master, and two long names sharing their first 40 characters are two environments. '--' never
# occurs in a BRANCH_BASE, so no branch's own name can equal another's suffixed one.
quote = '$(subst ','\'',$(1))'
BRANCH_BASE := $(shell printf '%s' $(call quote,$(BRANCH)) | LC_ALL=C tr 'A-Z' 'a-z' | LC_ALL=C sed -E 's/[^a-z0-9]+/-/g; s/^-+//; s/-+$$//')
ifeq ($(origin ENV),undefined)
ENV := $(shell b=$(call quote,$(BRANCH)); s=$(call quote,$(BRANCH_BASE)); \
  if [ -z "$$s" ]; then :; elif [ "$$s" = "$$b" ] && [ -z "$${s:40}" ]; then printf '%s' "$$s"; \
  else printf '%s--%s' "$$(printf '%s' "$$s" | cut -c1-32 | sed -E 's/-+$$//')" "$$(printf '%s' "$$b" | sha256sum | cut -c1-6)"; fi)
endif
STACK ?= app-$(ENV)
HASH ?= $(shell git rev-parse --short HEAD 2>/dev/null)
REPOSITORY ?= skiff-app
REGISTRY ?=
IMAGE ?= $(if $(REGISTRY),$(REGISTRY)/$(REPOSITORY),$(REPOSITORY))
BASE ?=
ALLOW_DIRTY ?=
TAG ?=
CARGO_TARGET_DIR ?= /root/.cache/skiff-target
CTL ?= $(or $(shell command -v ctl 2>/dev/null),$(CARGO_TARGET_DIR)/release/ctl)
CTL_FLAGS ?=
CTL_EXIT_FILE ?=
URL ?=
EXPECT_TAG ?= $(HASH)
WAIT ?= 120
MIN_HOSTS ?= 1
SITE_DOMAIN ?=
SERVER_NAME ?= $(if $(SITE_DOMAIN),$(ENV).$(SITE_DOMAIN))
CA ?=
INSECURE ?=
PYTHON ?= python3
FORCE ?=
PROTECTED ?= master main production prod
CONFIRM_PROTECTED ?=
DELETE_TIMEOUT ?= 3600
AGENT_BIN ?= $(CARGO_TARGET_DIR)/release/agent
AWS ?= aws
VPC_ID ?=
PUBLIC_SUBNETS ?=
PRIVATE_SUBNETS ?=
CERTIFICATE_ARN ?=
AMI_ID ?=
MIN_SIZE ?=
MAX_SIZE ?=
INSTANCE_TYPE ?=
TEMPLATE_BUCKET ?=
SHARED_LISTENER_ARN ?=
SHARED_LB_SECURITY_GROUP ?=
LISTENER_RULE_PRIORITY ?=
SITE_HOST_NAME ?= $(if $(and $(SHARED_LISTENER_ARN),$(SITE_DOMAIN)),$(ENV).$(SITE_DOMAIN))
DATABASE_HOST ?=
DATABASE_PORT ?=
DATABASE_NAME ?=
DATABASE_SECRET_ARN ?=
DATABASE_CLIENTS_SECURITY_GROUP ?=
DATABASE_SECURITY_GROUP ?=
DATABASE_MULTI_AZ ?=
DATABASE_DELETION_PROTECTION ?=
TRUSTED_KEYS ?=
SIGNING_KEY ?=
SIGNING_KMS_KEY ?=
SIGNING_PUBLIC_KEY ?=

export AWS_REGION := $(REGION)
export AWS_DEFAULT_REGION := $(REGION)

say = printf '[make] %s\n'

# Fails the recipe unless AWS credentials work: with the CLI, ask STS; without it, look for any
# of the usual credential sources so that ctl (which has no CLI) fails early and clearly too.
define need_aws
	if command -v $(AWS) >/dev/null 2>&1; then \
	  if ! who=$$($(AWS) sts get-caller-identity --region $(REGION) --query Arn --output text 2>&1); then \
	    $(say) "no usable AWS credentials: 'aws sts get-caller-identity' failed:" >&2; \
	    printf '  %s\n' "$$who" | tail -n 3 >&2; \
	    $(say) "set AWS_PROFILE, or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, and try again" >&2; exit 1; \
	  fi; \
	  $(say) "AWS identity: $$who ($(REGION))"; \
	elif [ -n "$${AWS_ACCESS_KEY_ID:-}$${AWS_PROFILE:-}$${AWS_WEB_IDENTITY_TOKEN_FILE:-}$${AWS_CONTAINER_CREDENTIALS_FULL_URI:-}$${AWS_CONTAINER_CREDENTIALS_RELATIVE_URI:-}" ] || [ -s "$${HOME}/.aws/credentials" ]; then \
	  $(say) "no AWS CLI to check the credentials with; going on with those in the environment"; \
	else \
	  $(say) "no AWS credentials: set AWS_PROFILE, or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY" >&2; exit 1; \
	fi
endef

# Fails the recipe unless BRANCH has an environment of its own: a detached HEAD, a name without
# a letter or digit, and a name that folds onto a protected environment without being it.
define need_branch
	if [ "$(BRANCH)" = HEAD ] || [ -z $(call quote,$(BRANCH)) ]; then \
	  $(say) "cannot tell the branch (detached HEAD?): pass BRANCH=<name>" >&2; exit 1; fi; \
	if [ -z "$(ENV)" ]; then \
	  $(say) "branch "$(call quote,$(BRANCH))" has no letter or digit to name an environment with" >&2; exit 1; fi; \
	for p in $(PROTECTED); do \
	  if { [ "$(ENV)" = "$$p" ] || [ "$(BRANCH_BASE)" = "$$p" ]; } && [ $(call quote,$(BRANCH)) != "$$p" ]; then \
	    $(say) "branch "$(call quote,$(BRANCH))" would reach the protected environment $$p (PROTECTED=$(PROTECTED))," >&2; \
	    $(say) "which only the branch named exactly $$p may: refused; rename the branch" >&2; exit 1; fi; \
	done
endef

# need_branch, and for a target that deploys (create-stack, update-stack): a protected environment
# other than master only with CONFIRM_PROTECTED=$(ENV), which Jenkins never passes, so that of all
# the branches CI deploys only master reaches a protected environment.
define need_deployable_branch
	$(need_branch); \
	for p in $(PROTECTED); do \
	  if [ "$(ENV)" = "$$p" ] && [ "$$p" != master ] && [ '$(CONFIRM_PROTECTED)' != "$$p" ]; then \
	    $(say) "$(ENV) is protected (PROTECTED=$(PROTECTED)) and only master deploys to one unasked:" >&2; \
	    $(say) "if you really mean to deploy branch $(BRANCH) onto $(STACK), add CONFIRM_PROTECTED=$(ENV)" >&2; exit 1; fi; \
	done
endef

# Fails the recipe unless TRUSTED_KEYS (when given) is a file of PEM public keys and nothing
# else: what the template's TrustedKeys pattern takes (at most 4,096 bytes), checked here so that
# a wrong file is refused before any AWS call, saying what it holds.
define need_trusted_keys
	f=$(call quote,$(TRUSTED_KEYS)); \
	if [ -n "$$f" ]; then \
	  if [ ! -f "$$f" ] || [ ! -r "$$f" ]; then \
	    $(say) "TRUSTED_KEYS=$$f: no such readable file (a file of PEM public keys, -----BEGIN PUBLIC KEY-----)" >&2; exit 1; fi; \
	  if grep -q -- 'PRIVATE KEY-----' "$$f"; then \
	    $(say) "TRUSTED_KEYS=$$f holds a private key: pass the public key only (openssl pkey -in <key> -pubout)" >&2; exit 1; fi; \
	  if ! problem=$$(LC_ALL=C awk ' \
	      function bad(why) { print why; failed = 1; exit 1 } \
	      /^[[:space:]]*$$/ { next } \
	      $$0 == "-----BEGIN PUBLIC KEY-----" { if (open) bad("line " NR ": a BEGIN inside a key"); open = 1; body = 0; next } \
	      $$0 == "-----END PUBLIC KEY-----" { if (!open || !body) bad("line " NR ": an END without a key"); open = 0; keys++; next } \
	      open && /^[A-Za-z0-9+\/=]+$$/ { body = 1; next } \
	      { bad("line " NR ": not part of a PEM public key: " substr($$0, 1, 40)) } \
	      END { if (failed) exit 1; if (open) bad("a key without its END line"); \
	            if (!keys) bad("no PEM public key (-----BEGIN PUBLIC KEY-----)") }' "$$f"); then \
	    $(say) "TRUSTED_KEYS=$$f: $$problem; expected one or more PEM public keys (openssl pkey -in <key> -pubout), nothing else" >&2; exit 1; fi; \
	  if [ "$$(wc -c <"$$f")" -gt 4096 ]; then \
	    $(say) "TRUSTED_KEYS=$$f is over 4,096 bytes, the most the stack's parameter holds: trust fewer keys" >&2; exit 1; fi; \
	fi
endef

# Sets `registry` to REGISTRY, else this account's ECR in REGION (asked of STS).
define find_registry
	registry='$(REGISTRY)'; \
	if [ -z "$$registry" ]; then \
	  $(need_aws); \
	  account=$$($(AWS) sts get-caller-identity --query Account --output text); \
	  registry="$$account.dkr.ecr.$(REGION).amazonaws.com"; \
	fi
endef

.PHONY: help
help: ## list the targets (default)
	@printf 'skiff make targets (variables and defaults: see the top of the Makefile):\n\n'
	@grep -hE '^[a-z][a-z-]*:.*## ' $(MAKEFILE_LIST) | sed -E 's/^([a-z-]+):.*## (.*)/  \1\t\2/' | expand -t 18
	@printf '\nnow: BRANCH=%s ENV=%s STACK=%s IMAGE=%s HASH=%s REGION=%s\n' \
	  '$(BRANCH)' '$(ENV)' '$(STACK)' '$(IMAGE)' '$(HASH)' '$(REGION)'

# What Jenkins asks first: the one definition of a branch's environment is this Makefile's.
.PHONY: env-name
env-name: ## print the environment (ENV) of BRANCH, or refuse a branch that may not have one
	@$(need_branch)
	@echo '$(ENV)'

.PHONY: build
build: ## build app/Dockerfile as $(IMAGE):$(HASH) and move $(IMAGE):$(ENV) to it
	@$(need_branch)
	@if [ -z "$(HASH)" ]; then $(say) "no git commit to tag the image with" >&2; exit 1; fi
	@# Only the build context counts: changes elsewhere do not reach the image.
	@if [ -n "$$(git status --porcelain -- app 2>/dev/null)" ] && [ "$(ALLOW_DIRTY)" != 1 ]; then \
	  $(say) "app/ has uncommitted changes, so the image would not be commit $(HASH):" >&2; \
	  git status --short -- app | head -n 10 >&2; \
	  $(say) "commit or stash them, or pass ALLOW_DIRTY=1 (the hash tag will then lie)" >&2; exit 1; fi
	@$(say) "building $(IMAGE):$(HASH) from app/ (branch $(BRANCH))"
	docker build $(if $(BASE),--build-arg BASE=$(BASE)) --label skiff.commit=$(HASH) \
	  --label skiff.branch=$(BRANCH) -t $(IMAGE):$(HASH) app
	@$(say) "tagging $(IMAGE):$(ENV) -> $(IMAGE):$(HASH) (the branch tag follows the newest build)"
	docker tag $(IMAGE):$(HASH) $(IMAGE):$(ENV)

.PHONY: push
push: ## push $(IMAGE):$(HASH) and :$(ENV) (to this account's ECR unless REGISTRY is set)
	@$(need_branch)
	@docker image inspect $(IMAGE):$(HASH) >/dev/null 2>&1 || { \
	  $(say) "no image $(IMAGE):$(HASH) here: run 'make build' first" >&2; exit 1; }
	@$(find_registry); \
	case "$$registry" in *.dkr.ecr.*.amazonaws.com) \
	  $(say) "logging in to $$registry"; \
	  $(AWS) ecr get-login-password --region $(REGION) | docker login --username AWS --password-stdin "$$registry" >/dev/null ;; \
	esac; \
	remote="$$registry/$(REPOSITORY)"; \
	for tag in $(HASH) $(ENV); do \
	  if [ "$$remote" != '$(IMAGE)' ]; then docker tag $(IMAGE):$(HASH) "$$remote:$$tag"; fi; \
	  $(say) "pushing $$remote:$$tag"; \
	  docker push -q "$$remote:$$tag"; \
	done

# The image is the one push pushed (SKIFF_IMAGE, else $(REGISTRY)/$(REPOSITORY)), not a stack's
# output: Jenkins signs before a new branch's stack exists. ctl asks ECR for its own token
# (ecr:GetAuthorizationToken and push rights on the repository: the signature is pushed beside
# the image).
.PHONY: sign
sign: ## sign $(HASH)'s digest (cosign's format) with SIGNING_KEY, or SIGNING_KMS_KEY + SIGNING_PUBLIC_KEY
	@$(need_branch)
	@if [ -n "$(SIGNING_KMS_KEY)" ] && [ -n "$(SIGNING_KEY)" ]; then \
	  $(say) "SIGNING_KEY and SIGNING_KMS_KEY are both set: pass one" >&2; exit 1; fi
	@if [ -n "$(SIGNING_KMS_KEY)" ]; then \
	  if [ -z "$(SIGNING_PUBLIC_KEY)" ] || [ ! -r "$(SIGNING_PUBLIC_KEY)" ]; then \
	    $(say) "SIGNING_KMS_KEY needs SIGNING_PUBLIC_KEY=<the KMS key's public key, PEM> (aws kms get-public-key), to check the signature" >&2; exit 1; fi; \
	elif [ -z "$(SIGNING_KEY)" ]; then \
	  $(say) "no signing key: pass SIGNING_KEY=<PEM PKCS#8 P-256 key file> (Jenkins: the skiff-signing-key file credential) or SIGNING_KMS_KEY=<KMS key> with SIGNING_PUBLIC_KEY=<its PEM>" >&2; exit 1; \
	elif [ ! -r "$(SIGNING_KEY)" ]; then \
	  $(say) "SIGNING_KEY=$(SIGNING_KEY): no such readable file" >&2; exit 1; fi
	@if [ -z "$(HASH)" ]; then $(say) "no git commit to sign the image of" >&2; exit 1; fi
	@if [ ! -x "$(CTL)" ] && ! command -v "$(CTL)" >/dev/null 2>&1; then \
	  $(say) "no ctl at $(CTL): build it (cargo build --release -p skiff-ctl) or pass CTL=<path>" >&2; exit 1; fi
	@image=$${SKIFF_IMAGE:-}; \
	if [ -z "$$image" ]; then $(find_registry); image="$$registry/$(REPOSITORY)"; fi; \
	if [ -n "$(SIGNING_KMS_KEY)" ]; then key=(--kms-key "$(SIGNING_KMS_KEY)" --public-key "$(SIGNING_PUBLIC_KEY)"); \
	else key=(--key-file "$(SIGNING_KEY)"); fi; \
	$(say) "$(CTL) --image $$image sign --tag $(HASH) $${key[*]}"; \
	$(CTL) --image "$$image" sign --tag $(HASH) "$${key[@]}"

.PHONY: test
test: ## run the whole test suite (.ci/test.sh)
	@$(say) "running .ci/test.sh"
	bash .ci/test.sh

.PHONY: dev
dev: ## run the app and an agent locally (testbed/dev/dev.sh)
	@$(say) "running testbed/dev/dev.sh"
	bash testbed/dev/dev.sh

# Undoes what `make dev` leaves running (its agent stops with Ctrl-C): the app containers (label
# skiff.app=skiff-dev) and the agent's port redirect (agent remove-redirect, which needs root like
# make dev). Images, Docker and the local registry stay (tests use them too). Safe to rerun.
.PHONY: dev-down
dev-down: ## remove what `make dev` left: its app containers and the agent's port redirect
	@dir=$${DEV_DIR:-.dev}; config=$$dir/agent.toml; agent=$(CARGO_TARGET_DIR)/debug/agent; \
	abs=$$(cd "$$dir" 2>/dev/null && pwd) || abs=; \
	if [ -n "$$abs" ] && pgrep -f -- "run --config $$abs/agent.toml" >/dev/null; then \
	  $(say) "the agent of make dev still runs (it would start the app again): stop it with Ctrl-C first" >&2; exit 1; fi; \
	ids=$$(docker ps -aq --filter label=skiff.app=skiff-dev 2>/dev/null | tr '\n' ' '); \
	if [ -n "$$ids" ]; then $(say) "removing the dev app containers: $$ids"; docker rm -f $$ids >/dev/null; \
	else $(say) "no dev app containers"; fi; \
	if [ ! -f "$$config" ]; then $(say) "no $$config: no redirect of make dev to remove"; \
	elif [ ! -x "$$agent" ]; then $(say) "no agent at $$agent to remove the redirect with: build it (cargo build -p skiff-agent)" >&2; exit 1; \
	else $(say) "$$agent remove-redirect --config $$config"; "$$agent" remove-redirect --config "$$config"; fi

.PHONY: fleet fleet-down fleet-scenarios fleet-bench
fleet: ## a 3-instance fleet behind a load balancer on this machine (testbed/fleet; README)
	bash testbed/fleet/fleet.sh up

fleet-down: ## tear the fleet of `make fleet` down, leaving nothing behind
	bash testbed/fleet/fleet.sh down

fleet-scenarios: ## release scenarios on the fleet with the real ctl, one line each
	bash testbed/fleet/fleet.sh scenarios

fleet-bench: ## every fleet scenario, then refresh and in-place releases side by side (wall, floor, ratio)
	bash testbed/fleet/fleet.sh bench

.PHONY: fleet-branch
fleet-branch: ## the branch flow in the fleet box with the real app: create-stack, integration, releases, delete-stack
	bash testbed/fleet/branch.sh

.PHONY: lint
lint: ## lint what is not Rust: templates, packer, shell scripts, Python, Jenkinsfile
	@$(say) "cfn-lint + checkov + moto stack tests (templates/test.sh)"
	bash templates/test.sh
	@$(say) "packer fmt and validate"
	packer fmt -check packer
	packer fmt -check packer/test
	packer validate -var agent_bin=/bin/true packer/skiff.pkr.hcl
	@$(say) "shellcheck (every shell script) and ruff (every Python file)"
	bash testbed/checks/lint.sh
	@$(say) "Jenkinsfile syntax"
	bash testbed/checks/jenkinsfile-check.sh

# The release parameter is not the stack's (a stack update would write an old tag over ctl's):
# created here once, before the stack, without --overwrite; from then on only ctl release writes it.
# A stack from before still owns it as its ReleaseParameter resource, which the update deletes
# (with the value): the value is read first and the parameter put back after the update.
# A template sent inline is at most 51,200 bytes; a larger one goes through S3 (TEMPLATE_BUCKET):
# https://docs.aws.amazon.com/AWSCloudFormation/latest/UserGuide/cloudformation-limits.html
.PHONY: create-stack
create-stack: ## create or update this branch's stack $(STACK) from templates/app.yaml (and its release parameter)
	@if [ -n "$(filter-out none,$(DATABASE_SECURITY_GROUP))" ]; then \
	  $(say) "DATABASE_SECURITY_GROUP is deprecated: it adds a rule per stack to the shared database's group (60 rules at most). Pass DATABASE_CLIENTS_SECURITY_GROUP=<the database stack's output ClientsSecurityGroup> with it, replace the instances (ctl release --strategy refresh), then update with DATABASE_SECURITY_GROUP=none" >&2; fi
	@$(need_deployable_branch)
	@$(need_trusted_keys)
	@$(need_aws)
	@overrides=(Environment=$(ENV)); owned=; \
	if $(AWS) cloudformation describe-stacks --stack-name $(STACK) --region $(REGION) >/dev/null 2>&1; then \
	  $(say) "stack $(STACK) exists: updating it (unset parameters keep their values; the release is left alone)"; \
	  owned=$$($(AWS) cloudformation describe-stack-resources --region $(REGION) --stack-name $(STACK) \
	    --logical-resource-id ReleaseParameter --query 'StackResources[0].PhysicalResourceId' --output text 2>/dev/null || true); \
	  if [ -n "$$owned" ] && [ "$$owned" != None ]; then \
	    owned=$$($(AWS) ssm get-parameter --region $(REGION) --name "$$owned" --query Parameter.Value --output text); \
	    $(say) "the stack still owns the release parameter (a template from before): the update deletes it; its value $$owned is put back afterwards"; \
	  else owned=; fi; \
	else \
	  missing=(); \
	  for v in VPC_ID=$(VPC_ID) PUBLIC_SUBNETS=$(PUBLIC_SUBNETS) PRIVATE_SUBNETS=$(PRIVATE_SUBNETS) \
	           $(if $(SHARED_LISTENER_ARN),SHARED_LB_SECURITY_GROUP=$(SHARED_LB_SECURITY_GROUP) SITE_HOST_NAME=$(SITE_HOST_NAME) LISTENER_RULE_PRIORITY=$(LISTENER_RULE_PRIORITY),CERTIFICATE_ARN=$(CERTIFICATE_ARN)) AMI_ID=$(AMI_ID); do \
	    [ -n "$${v#*=}" ] || missing+=("$${v%%=*}"); done; \
	  if (($${#missing[@]})); then \
	    $(say) "stack $(STACK) does not exist; to create it set: $${missing[*]}" >&2; exit 1; fi; \
	  $(say) "creating stack $(STACK)"; \
	fi; \
	if [ -z "$(HASH)" ]; then $(say) "no git commit to name the first release with" >&2; exit 1; fi; \
	size=$$(wc -c <templates/app.yaml); \
	if [ "$$size" -gt 51200 ] && [ -z '$(TEMPLATE_BUCKET)' ]; then \
	  $(say) "templates/app.yaml is $$size bytes, over the 51,200 CloudFormation takes inline: pass TEMPLATE_BUCKET=<an S3 bucket of this account> (deploy uploads the template there)" >&2; exit 1; fi; \
	parameter=/skiff/$(ENV)/release; \
	if err=$$($(AWS) ssm put-parameter --region $(REGION) --name "$$parameter" --type String \
	      --value $(HASH) --description "skiff release of $(ENV), written by ctl release" 2>&1 >/dev/null); then \
	  $(say) "created the release parameter $$parameter = $(HASH) (the agents wait until that image exists)"; \
	elif grep -q ParameterAlreadyExists <<<"$$err"; then \
	  current=$$($(AWS) ssm get-parameter --region $(REGION) --name "$$parameter" --query Parameter.Value --output text); \
	  $(say) "the release parameter $$parameter exists: kept its value $$current (only ctl release changes it)"; \
	else \
	  $(say) "could not create the release parameter $$parameter:" >&2; printf '  %s\n' "$$err" >&2; exit 1; \
	fi; \
	for v in VpcId=$(VPC_ID) PublicSubnetIds=$(PUBLIC_SUBNETS) PrivateSubnetIds=$(PRIVATE_SUBNETS) \
	         CertificateArn=$(CERTIFICATE_ARN) AmiId=$(AMI_ID) MinSize=$(MIN_SIZE) MaxSize=$(MAX_SIZE) \
	         InstanceType=$(INSTANCE_TYPE) ImageRepositoryName=$(REPOSITORY) \
	         DatabaseHost=$(DATABASE_HOST) DatabasePort=$(DATABASE_PORT) DatabaseName=$(DATABASE_NAME) \
	         DatabaseSecretArn=$(DATABASE_SECRET_ARN) DatabaseClientsSecurityGroupId=$(DATABASE_CLIENTS_SECURITY_GROUP) \
	         DatabaseSecurityGroupId=$(filter-out none,$(DATABASE_SECURITY_GROUP)) \
	         DatabaseMultiAZ=$(DATABASE_MULTI_AZ) DatabaseDeletionProtection=$(DATABASE_DELETION_PROTECTION) \
	         SharedListenerArn=$(SHARED_LISTENER_ARN) SharedLoadBalancerSecurityGroupId=$(SHARED_LB_SECURITY_GROUP) \
	         SiteHostName=$(SITE_HOST_NAME) ListenerRulePriority=$(LISTENER_RULE_PRIORITY); do \
	  [ -z "$${v#*=}" ] || overrides+=("$$v"); done; \
	if [ "$(DATABASE_SECURITY_GROUP)" = none ]; then overrides+=("DatabaseSecurityGroupId="); fi; \
	shown=("$${overrides[@]}"); \
	if [ -n $(call quote,$(TRUSTED_KEYS)) ]; then \
	  overrides+=("TrustedKeys=$$(cat $(call quote,$(TRUSTED_KEYS)))"); \
	  shown+=("TrustedKeys=<$$(grep -c -- '-----BEGIN PUBLIC KEY-----' $(call quote,$(TRUSTED_KEYS))) key(s) of $(TRUSTED_KEYS)>"); \
	  $(say) "the hosts will run only images signed by a key of $(TRUSTED_KEYS) (stack parameter TrustedKeys)"; \
	fi; \
	$(say) "aws cloudformation deploy --stack-name $(STACK) --parameter-overrides $${shown[*]}"; \
	$(AWS) cloudformation deploy --region $(REGION) --stack-name $(STACK) \
	  --template-file templates/app.yaml --capabilities CAPABILITY_IAM \
	  $(if $(TEMPLATE_BUCKET),--s3-bucket $(TEMPLATE_BUCKET) --s3-prefix skiff-templates/$(ENV)) \
	  --no-fail-on-empty-changeset --tags skiff:environment=$(ENV) \
	  --parameter-overrides "$${overrides[@]}"; \
	if [ -n "$$owned" ] && ! $(AWS) ssm get-parameter --region $(REGION) --name "$$parameter" >/dev/null 2>&1; then \
	  $(AWS) ssm put-parameter --region $(REGION) --name "$$parameter" --type String --value "$$owned" \
	    --description "skiff release of $(ENV), written by ctl release" >/dev/null; \
	  $(say) "put the release parameter $$parameter back: $$owned (no longer the stack's)"; \
	fi; \
	$(AWS) cloudformation describe-stacks --region $(REGION) --stack-name $(STACK) \
	  --query 'Stacks[0].Outputs[].[OutputKey,OutputValue]' --output text

.PHONY: update-stack
update-stack: ## release TAG to this branch's fleet: ctl --stack $(STACK) release --tag $(TAG) $(CTL_FLAGS)
	@$(need_deployable_branch)
	@$(need_trusted_keys)
	@if [ -z "$(TAG)" ]; then \
	  $(say) "which release? pass TAG=<image tag>, e.g. TAG=$(HASH) make update-stack" >&2; exit 1; fi
	@if [ ! -x "$(CTL)" ] && ! command -v "$(CTL)" >/dev/null 2>&1; then \
	  $(say) "no ctl at $(CTL): build it (cargo build --release -p skiff-ctl) or pass CTL=<path>" >&2; exit 1; fi
	@$(need_aws)
	@# ctl resolves the tag in ECR, which takes a token as password (kept out of the output).
	@# ctl reads a named stack even when the three direct values override all its outputs.
	@if [ -z "$${SKIFF_REGISTRY_PASSWORD:-}" ] && command -v $(AWS) >/dev/null 2>&1; then \
	  SKIFF_REGISTRY_PASSWORD=$$($(AWS) ecr get-login-password --region $(REGION)) || { \
	    $(say) "could not get an ECR token (aws ecr get-login-password)" >&2; exit 1; }; \
	  export SKIFF_REGISTRY_USER=AWS SKIFF_REGISTRY_PASSWORD; \
	fi; \
	stack=(--stack $(STACK)); \
	if [ -n "$${SKIFF_PARAMETER:-}" ] && [ -n "$${SKIFF_ASG:-}" ] && [ -n "$${SKIFF_IMAGE:-}" ]; then \
	  stack=(); $(say) "SKIFF_PARAMETER, SKIFF_ASG and SKIFF_IMAGE are set: not reading stack $(STACK)"; fi; \
	if [ -n $(call quote,$(TRUSTED_KEYS)) ]; then stack+=(--trusted-keys $(call quote,$(TRUSTED_KEYS))); fi; \
	$(say) "$(CTL) $${stack[*]} release --tag $(TAG) $(CTL_FLAGS)"; \
	rc=0; $(CTL) "$${stack[@]}" release --tag $(TAG) $(CTL_FLAGS) || rc=$$?; \
	if [ -n "$(CTL_EXIT_FILE)" ]; then echo "$$rc" >"$(CTL_EXIT_FILE)"; fi; \
	exit "$$rc"

# Read-only: what Jenkins asks before choosing between create-stack and update-stack.
.PHONY: stack-status
stack-status: ## print $(STACK)'s CloudFormation status, or NONE when it does not exist
	@$(need_branch)
	@if out=$$($(AWS) cloudformation describe-stacks --region $(REGION) --stack-name $(STACK) \
	      --query 'Stacks[0].StackStatus' --output text 2>&1); then echo "$$out"; \
	elif grep -q 'does not exist' <<<"$$out"; then echo NONE; \
	else $(say) "cannot read stack $(STACK):" >&2; printf '  %s\n' "$$out" >&2; exit 1; fi

# The app's end-to-end checks (app/integration.py, Python stdlib only) against a deployment:
# URL, or this branch's stack through its load balancer's DNS name.
.PHONY: integration
integration: ## end-to-end checks of a deployment: URL=https://... (default: the stack's load balancer), EXPECT_TAG=$(HASH)
	@url='$(URL)'; \
	if [ -z "$$url" ]; then \
	  $(need_branch); $(need_aws); \
	  dns=$$($(AWS) cloudformation describe-stacks --region $(REGION) --stack-name $(STACK) \
	    --query "Stacks[0].Outputs[?OutputKey=='LoadBalancerDNS'].OutputValue" --output text 2>&1) || dns=; \
	  if [ -z "$$dns" ] || [ "$$dns" = None ]; then \
	    $(say) "no URL given and no LoadBalancerDNS output of stack $(STACK): pass URL=https://<the deployment>" >&2; exit 1; fi; \
	  url=https://$$dns; \
	  $(say) "checking $(STACK) at $$url"; \
	fi; \
	args=(--expect-tag '$(EXPECT_TAG)' --wait '$(WAIT)' --min-hosts '$(MIN_HOSTS)'); \
	if [ -n '$(SERVER_NAME)' ]; then args+=(--server-name '$(SERVER_NAME)'); fi; \
	if [ -n '$(CA)' ]; then args+=(--ca '$(CA)'); fi; \
	if [ '$(INSECURE)' = 1 ]; then args+=(--insecure); fi; \
	$(say) "$(PYTHON) app/integration.py $$url $${args[*]}"; \
	$(PYTHON) app/integration.py "$$url" "$${args[@]}"

# Tears a branch environment down: the stack (its own database leaves its final snapshot:
# DeletionPolicy: Snapshot in templates/app.yaml), then what the stack does not own: every
# parameter under /skiff/$(ENV)/ (release, release lock, env/...) and the log groups
# (/skiff/$(ENV)/..., and the own database's /aws/rds/instance/<id>/... exports, which RDS makes).
# A protected environment (PROTECTED) is refused even with FORCE=1, unless CONFIRM_PROTECTED=$(ENV).
.PHONY: delete-stack
delete-stack: ## delete $(STACK), its parameters /skiff/$(ENV)/ and log groups (asks first; FORCE=1 does not; master needs CONFIRM_PROTECTED)
	@$(need_branch)
	@for p in $(PROTECTED); do \
	  if [ '$(ENV)' = "$$p" ] && [ '$(CONFIRM_PROTECTED)' != '$(ENV)' ]; then \
	    $(say) "$(ENV) is protected (PROTECTED=$(PROTECTED)): FORCE=1 alone does not delete it;" >&2; \
	    $(say) "if you really mean to delete $(STACK) and its data, add CONFIRM_PROTECTED=$(ENV)" >&2; exit 1; fi; \
	done
	@if ! [[ '$(DELETE_TIMEOUT)' =~ ^[0-9]+$$ ]] || [ '$(DELETE_TIMEOUT)' -lt 30 ]; then \
	  $(say) "DELETE_TIMEOUT=$(DELETE_TIMEOUT): expected whole seconds, at least 30" >&2; exit 1; fi
	@if [ '$(FORCE)' != 1 ]; then \
	  if [ -t 0 ]; then \
	    printf '[make] delete stack %s with everything of %s (parameters /skiff/%s/, log groups)? Type %s to go on: ' \
	      '$(STACK)' '$(ENV)' '$(ENV)' '$(ENV)'; \
	    read -r answer || answer=; \
	    if [ "$$answer" != '$(ENV)' ]; then $(say) "not confirmed: nothing deleted" >&2; exit 1; fi; \
	  else \
	    $(say) "delete-stack asks for a confirmation on a terminal and there is none: pass FORCE=1 to delete $(STACK) without asking" >&2; exit 1; \
	  fi; \
	fi
	@$(need_aws)
	@region=(--region $(REGION)); db=; \
	status=$$($(AWS) cloudformation describe-stacks "$${region[@]}" --stack-name $(STACK) \
	  --query 'Stacks[0].StackStatus' --output text 2>&1) || { \
	  if grep -q 'does not exist' <<<"$$status"; then status=NONE; \
	  else $(say) "cannot read stack $(STACK):" >&2; printf '  %s\n' "$$status" >&2; exit 1; fi; }; \
	if [ "$$status" = NONE ]; then \
	  $(say) "stack $(STACK) does not exist (already deleted?): cleaning up what is left of $(ENV)"; \
	else \
	  db=$$($(AWS) cloudformation describe-stack-resources "$${region[@]}" --stack-name $(STACK) \
	    --logical-resource-id Database --query 'StackResources[0].PhysicalResourceId' --output text 2>/dev/null) || db=; \
	  [ "$$db" != None ] || db=; \
	  if [ -n "$$db" ] && [ "$$($(AWS) rds describe-db-instances "$${region[@]}" --db-instance-identifier "$$db" \
	        --query 'DBInstances[0].DeletionProtection' --output text 2>/dev/null)" = True ]; then \
	    $(say) "the stack's database $$db has deletion protection: turning it off (the final snapshot is kept)"; \
	    $(AWS) rds modify-db-instance "$${region[@]}" --db-instance-identifier "$$db" \
	      --no-deletion-protection --apply-immediately >/dev/null; \
	  fi; \
	  if lock=$$($(AWS) ssm get-parameter "$${region[@]}" --name /skiff/$(ENV)/release-lock \
	        --query Parameter.Value --output text 2>/dev/null); then \
	    $(say) "warning: a release holds /skiff/$(ENV)/release-lock ($$lock); deleting anyway"; fi; \
	  $(say) "deleting stack $(STACK) (status $$status), waiting at most $(DELETE_TIMEOUT) s"; \
	  $(AWS) cloudformation delete-stack "$${region[@]}" --stack-name $(STACK); \
	  start=$$SECONDS; last=; \
	  while :; do \
	    if ! status=$$($(AWS) cloudformation describe-stacks "$${region[@]}" --stack-name $(STACK) \
	          --query 'Stacks[0].StackStatus' --output text 2>&1); then \
	      if grep -q 'does not exist' <<<"$$status"; then break; fi; \
	      $(say) "cannot read stack $(STACK) while it is deleted (retrying): $$status" >&2; status=unknown; \
	    fi; \
	    [ "$$status" = DELETE_COMPLETE ] && break; \
	    [ "$$status" = "$$last" ] || $(say) "$(STACK): $$status ($$((SECONDS - start)) s)"; last=$$status; \
	    if [ "$$status" = DELETE_FAILED ]; then \
	      $(say) "deleting $(STACK) failed; the resources that refused:" >&2; \
	      $(AWS) cloudformation describe-stack-events "$${region[@]}" --stack-name $(STACK) --max-items 50 \
	        --query "StackEvents[?ResourceStatus=='DELETE_FAILED'].[LogicalResourceId,ResourceStatusReason]" \
	        --output text >&2 || true; \
	      $(say) "fix those, then run make delete-stack again; parameters and log groups were left as they are" >&2; \
	      exit 1; \
	    fi; \
	    if (( SECONDS - start >= $(DELETE_TIMEOUT) )); then \
	      $(say) "$(STACK) is still $$status after $(DELETE_TIMEOUT) s; look at its events in the console and run" >&2; \
	      $(say) "make delete-stack again to finish (parameters and log groups are cleaned after the stack)" >&2; exit 1; \
	    fi; \
	    sleep 10; \
	  done; \
	  $(say) "stack $(STACK) deleted ($$((SECONDS - start)) s)"; \
	fi; \
	names=$$($(AWS) ssm get-parameters-by-path "$${region[@]}" --path /skiff/$(ENV)/ --recursive \
	  --query 'Parameters[].Name' --output text); \
	names=($$names); \
	for ((i = 0; i < $${#names[@]}; i += 10)); do \
	  $(AWS) ssm delete-parameters "$${region[@]}" --names "$${names[@]:i:10}" --output text >/dev/null; \
	done; \
	$(say) "deleted $${#names[@]} parameter(s) under /skiff/$(ENV)/: $${names[*]:-none}"; \
	prefixes=(/skiff/$(ENV)/); [ -z "$$db" ] || prefixes+=("/aws/rds/instance/$$db/"); \
	for prefix in "$${prefixes[@]}"; do \
	  groups=$$($(AWS) logs describe-log-groups "$${region[@]}" --log-group-name-prefix "$$prefix" \
	    --query 'logGroups[].logGroupName' --output text); \
	  for g in $$groups; do \
	    $(AWS) logs delete-log-group "$${region[@]}" --log-group-name "$$g"; $(say) "deleted log group $$g"; \
	  done; \
	done; \
	if [ -n '$(TEMPLATE_BUCKET)' ]; then \
	  $(AWS) s3 rm "$${region[@]}" --recursive --quiet s3://$(TEMPLATE_BUCKET)/skiff-templates/$(ENV)/; \
	  $(say) "deleted the uploaded templates s3://$(TEMPLATE_BUCKET)/skiff-templates/$(ENV)/"; \
	fi; \
	if [ -n "$$db" ]; then \
	  snaps=$$($(AWS) rds describe-db-snapshots "$${region[@]}" --db-instance-identifier "$$db" \
	    --query 'DBSnapshots[].DBSnapshotIdentifier' --output text 2>/dev/null || true); \
	  $(say) "the database's final snapshot stays (delete it when no longer needed): $${snaps:-none found yet}"; \
	fi; \
	left=$$($(AWS) ssm get-parameters-by-path "$${region[@]}" --path /skiff/$(ENV)/ --recursive \
	  --query 'Parameters[].Name' --output text; \
	  $(AWS) logs describe-log-groups "$${region[@]}" --log-group-name-prefix /skiff/$(ENV)/ \
	  --query 'logGroups[].logGroupName' --output text); \
	if [ -n "$$(tr -d '[:space:]' <<<"$$left")" ]; then \
	  $(say) "still there after the cleanup (created meanwhile?): $$left; run make delete-stack again" >&2; exit 1; fi; \
	$(say) "nothing of $(ENV) is left"

.PHONY: ami
ami: ## build the AMI with packer (packer/skiff.pkr.hcl, agent from AGENT_BIN)
	@if [ ! -x "$(AGENT_BIN)" ]; then \
	  $(say) "no agent binary at $(AGENT_BIN): build it (cargo build --release -p skiff-agent) or pass AGENT_BIN=<path>" >&2; exit 1; fi
	@$(need_aws)
	@$(say) "packer build packer/ (agent $(AGENT_BIN), region $(REGION))"
	packer init packer
	packer build -var agent_bin=$(AGENT_BIN) -var region=$(REGION) packer
