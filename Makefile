# skiff: build the app image, test, run locally, and manage this branch's stack and releases.
# `make` alone lists the targets. Every variable below can be set on the command line
# (`make push REGISTRY=127.0.0.1:5000`) or in the environment.
#
# Variables and their defaults:
#   REGION       AWS region                        $AWS_REGION, else $AWS_DEFAULT_REGION, else us-east-1
#   BRANCH       git branch                        $BRANCH_NAME (Jenkins), else the checked-out branch
#   ENV          environment = BRANCH sanitized    lowercase, [a-z0-9-], at most 40 characters
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
#   Database (optional; default: the stack creates its own RDS MySQL instance):
#   DATABASE_HOST DATABASE_PORT DATABASE_NAME DATABASE_SECRET_ARN DATABASE_SECURITY_GROUP
#                an existing database instead (templates/README.md, "Sharing a database")
#   DATABASE_MULTI_AZ DATABASE_DELETION_PROTECTION ("true"/"false") the own database's settings

SHELL := bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help
MAKEFLAGS += --no-print-directory

REGION ?= $(or $(AWS_REGION),$(AWS_DEFAULT_REGION),us-east-1)
BRANCH ?= $(or $(BRANCH_NAME),$(shell git rev-parse --abbrev-ref HEAD 2>/dev/null))
# refs like feature/Login_Fix -> feature-login-fix: valid in a stack name, a parameter path and a tag
ENV ?= $(shell printf '%s' '$(BRANCH)' | tr 'A-Z' 'a-z' | sed -E 's/[^a-z0-9]+/-/g; s/^-+//; s/-+$$//' | cut -c1-40 | sed -E 's/-+$$//')
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
DATABASE_HOST ?=
DATABASE_PORT ?=
DATABASE_NAME ?=
DATABASE_SECRET_ARN ?=
DATABASE_SECURITY_GROUP ?=
DATABASE_MULTI_AZ ?=
DATABASE_DELETION_PROTECTION ?=

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

define need_branch
	if [ -z "$(ENV)" ] || [ "$(BRANCH)" = HEAD ]; then \
	  $(say) "cannot tell the branch (detached HEAD?): pass BRANCH=<name>" >&2; exit 1; fi
endef

.PHONY: help
help: ## list the targets (default)
	@printf 'skiff make targets (variables and defaults: see the top of the Makefile):\n\n'
	@grep -hE '^[a-z][a-z-]*:.*## ' $(MAKEFILE_LIST) | sed -E 's/^([a-z-]+):.*## (.*)/  \1\t\2/' | expand -t 18
	@printf '\nnow: BRANCH=%s ENV=%s STACK=%s IMAGE=%s HASH=%s REGION=%s\n' \
	  '$(BRANCH)' '$(ENV)' '$(STACK)' '$(IMAGE)' '$(HASH)' '$(REGION)'

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
	@registry='$(REGISTRY)'; \
	if [ -z "$$registry" ]; then \
	  $(need_aws); \
	  account=$$($(AWS) sts get-caller-identity --query Account --output text); \
	  registry="$$account.dkr.ecr.$(REGION).amazonaws.com"; \
	fi; \
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

.PHONY: test
test: ## run the whole test suite (.ci/test.sh)
	@$(say) "running .ci/test.sh"
	bash .ci/test.sh

.PHONY: dev
dev: ## run the app and an agent locally (.ci/dev.sh)
	@$(say) "running .ci/dev.sh"
	bash .ci/dev.sh

.PHONY: fleet fleet-down fleet-scenarios
fleet: ## a 3-instance fleet behind a load balancer on this machine (.ci/fleet; README)
	bash .ci/fleet/fleet.sh up

fleet-down: ## tear the fleet of `make fleet` down, leaving nothing behind
	bash .ci/fleet/fleet.sh down

fleet-scenarios: ## release scenarios on the fleet with the real ctl, one line each
	bash .ci/fleet/fleet.sh scenarios

.PHONY: lint
lint: ## lint what is not Rust: templates, packer, shell scripts, Jenkinsfile
	@$(say) "cfn-lint + checkov + moto stack tests (templates/test.sh)"
	bash templates/test.sh
	@$(say) "packer fmt and validate"
	packer fmt -check packer
	packer fmt -check packer/test
	packer validate -var agent_bin=/bin/true packer/skiff.pkr.hcl
	@$(say) "shellcheck"
	shellcheck packer/scripts/*.sh packer/test.sh templates/test.sh .ci/jenkinsfile-check.sh .ci/make-check.sh
	@$(say) "Jenkinsfile syntax"
	bash .ci/jenkinsfile-check.sh

# The release parameter is not the stack's (a stack update would write an old tag over ctl's):
# created here once, before the stack, without --overwrite; from then on only ctl release writes it.
# A stack from before still owns it as its ReleaseParameter resource, which the update deletes
# (with the value): the value is read first and the parameter put back after the update.
.PHONY: create-stack
create-stack: ## create or update this branch's stack $(STACK) from templates/app.yaml (and its release parameter)
	@$(need_branch)
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
	           CERTIFICATE_ARN=$(CERTIFICATE_ARN) AMI_ID=$(AMI_ID); do \
	    [ -n "$${v#*=}" ] || missing+=("$${v%%=*}"); done; \
	  if (($${#missing[@]})); then \
	    $(say) "stack $(STACK) does not exist; to create it set: $${missing[*]}" >&2; exit 1; fi; \
	  $(say) "creating stack $(STACK)"; \
	fi; \
	if [ -z "$(HASH)" ]; then $(say) "no git commit to name the first release with" >&2; exit 1; fi; \
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
	         DatabaseSecretArn=$(DATABASE_SECRET_ARN) DatabaseSecurityGroupId=$(DATABASE_SECURITY_GROUP) \
	         DatabaseMultiAZ=$(DATABASE_MULTI_AZ) DatabaseDeletionProtection=$(DATABASE_DELETION_PROTECTION); do \
	  [ -z "$${v#*=}" ] || overrides+=("$$v"); done; \
	$(say) "aws cloudformation deploy --stack-name $(STACK) --parameter-overrides $${overrides[*]}"; \
	$(AWS) cloudformation deploy --region $(REGION) --stack-name $(STACK) \
	  --template-file templates/app.yaml --capabilities CAPABILITY_IAM \
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
	@$(need_branch)
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
	$(say) "$(CTL) $${stack[*]} release --tag $(TAG) $(CTL_FLAGS)"; \
	$(CTL) "$${stack[@]}" release --tag $(TAG) $(CTL_FLAGS)

.PHONY: ami
ami: ## build the AMI with packer (packer/skiff.pkr.hcl, agent from AGENT_BIN)
	@if [ ! -x "$(AGENT_BIN)" ]; then \
	  $(say) "no agent binary at $(AGENT_BIN): build it (cargo build --release -p skiff-agent) or pass AGENT_BIN=<path>" >&2; exit 1; fi
	@$(need_aws)
	@$(say) "packer build packer/ (agent $(AGENT_BIN), region $(REGION))"
	packer init packer
	packer build -var agent_bin=$(AGENT_BIN) -var region=$(REGION) packer
