# Test double of skiff.pkr.hcl: the same uploads and provisioning scripts, run by the docker
# builder in a local Debian image instead of an EC2 instance. packer/test.sh builds it and then
# inspects the committed image; nothing is pulled (the base image is built offline by
# .ci/setup.sh) and the result is tagged with a name unique to the run.

variable "base_image" {
  type    = string
  default = "skiff-ci/python:3.11-bookworm"
}

variable "agent_bin" {
  type = string
}

variable "repository" {
  type        = string
  description = "Repository to tag the result with, e.g. skiff-packer-test."
}

variable "tag" {
  type        = string
  description = "Tag unique to the run, so that cleanup removes exactly this image."
}

variable "packer_dir" {
  type        = string
  description = "The packer/ folder whose files and scripts are under test."
}

source "docker" "skiff" {
  image  = var.base_image
  pull   = false
  commit = true
  # Labelled so that packer/test.sh can remove the container even if packer could not.
  run_command = ["-d", "-i", "-t", "--label", "skiff-test=${var.tag}", "--entrypoint=/bin/sh", "--", "{{.Image}}"]
  changes = [
    "LABEL skiff-test=${var.tag}",
  ]
}

build {
  sources = ["source.docker.skiff"]

  # The same three steps as skiff.pkr.hcl's build (packer/test.sh compares them); the commands
  # run as root already, so no sudo in execute_command.
  provisioner "file" {
    source      = var.agent_bin
    destination = "/tmp/skiff-agent"
  }

  provisioner "file" {
    source      = "${var.packer_dir}/files/skiff-agent.service"
    destination = "/tmp/skiff-agent.service"
  }

  provisioner "shell" {
    execute_command = "chmod +x {{ .Path }}; {{ .Vars }} bash {{ .Path }}"
    scripts = [
      "${var.packer_dir}/scripts/10-docker.sh",
      "${var.packer_dir}/scripts/15-nftables.sh",
      "${var.packer_dir}/scripts/20-agent.sh",
    ]
  }

  post-processor "docker-tag" {
    repository = var.repository
    tag        = [var.tag]
  }
}
