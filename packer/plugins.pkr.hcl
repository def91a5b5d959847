# Plugin requirements for current Packer (>= 1.7), where the Amazon builder is a separate plugin:
# `packer init packer/` installs it. Kept apart from skiff.pkr.hcl because Packer 1.6 (Debian's
# package, used by packer/test.sh) bundles the builder and rejects `required_plugins`; the test
# validates skiff.pkr.hcl without this file.
packer {
  required_version = ">= 1.7.0"
  required_plugins {
    amazon = {
      source  = "github.com/hashicorp/amazon"
      version = ">= 1.2.0"
    }
  }
}
