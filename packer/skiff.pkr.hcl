# The skiff AMI: Amazon Linux 2023 with Docker and the skiff agent (enabled, started by the
# instance's user data once it has written /etc/skiff/agent.toml).
#
#   packer init packer/            # once, current Packer: installs the Amazon plugin
#   packer build -var agent_bin=/path/to/agent packer/
#
# `make ami` does both with the workspace's release build. The AMI id it prints is the app
# stack's AmiId parameter. The provisioning itself is in packer/scripts/*.sh, which
# packer/test/docker.pkr.hcl runs against a local Debian image to test it.

variable "region" {
  type        = string
  default     = "us-east-1"
  description = "Region to build (and keep) the AMI in."
}

variable "instance_type" {
  type        = string
  default     = "t3.small"
  description = "Build instance type; x86_64, like the agent binary."
}

variable "agent_bin" {
  type        = string
  description = "Path of the agent binary to bake in (a Linux x86_64 build that runs on AL2023's glibc)."
}

variable "ami_name_prefix" {
  type    = string
  default = "skiff"
}

variable "subnet_id" {
  type        = string
  default     = ""
  description = "Subnet for the build instance; empty for the default VPC."
}

locals {
  # AMI names must be unique per account and region.
  stamp = formatdate("YYYYMMDD-hhmmss", timestamp())
}

source "amazon-ebs" "skiff" {
  region          = var.region
  instance_type   = var.instance_type
  subnet_id       = var.subnet_id
  ami_name        = "${var.ami_name_prefix}-al2023-${local.stamp}"
  ami_description = "skiff: Amazon Linux 2023, Docker, skiff agent"

  # The newest Amazon Linux 2023 AMI from Amazon itself, not a look-alike.
  source_ami_filter {
    filters = {
      name                = "al2023-ami-2023.*-kernel-*-x86_64"
      architecture        = "x86_64"
      root-device-type    = "ebs"
      virtualization-type = "hvm"
    }
    owners      = ["amazon"]
    most_recent = true
  }

  ssh_username = "ec2-user"

  # IMDSv2 is enforced where the AMI runs, by the app stack's launch template. (The build
  # instance's metadata_options / imds_support need the newer Amazon plugin, not Packer 1.6.)

  launch_block_device_mappings {
    device_name           = "/dev/xvda"
    volume_size           = 30
    volume_type           = "gp3"
    iops                  = 3000
    throughput            = 125
    encrypted             = true
    delete_on_termination = true
  }

  tags = {
    Name         = "${var.ami_name_prefix}-al2023-${local.stamp}"
    "skiff:role" = "ami"
    "skiff:base" = "{{ .SourceAMIName }}"
  }
}

build {
  sources = ["source.amazon-ebs.skiff"]

  # Keep these three steps in step with packer/test/docker.pkr.hcl (packer/test.sh compares).
  provisioner "file" {
    source      = var.agent_bin
    destination = "/tmp/skiff-agent"
  }

  provisioner "file" {
    source      = "${path.root}/files/skiff-agent.service"
    destination = "/tmp/skiff-agent.service"
  }

  provisioner "shell" {
    execute_command = "chmod +x {{ .Path }}; sudo -E {{ .Vars }} bash {{ .Path }}"
    scripts = [
      "${path.root}/scripts/10-docker.sh",
      "${path.root}/scripts/15-nftables.sh",
      "${path.root}/scripts/20-agent.sh",
    ]
  }
}
