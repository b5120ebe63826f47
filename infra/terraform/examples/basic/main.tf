# An example root: pilotlight in one region, receiver in a private subnet.
#   terraform init && terraform apply -var artifact_bucket=... -var vpc_id=... -var subnet_id=...
# See infra/README.md for the whole deploy (packaging, sender, first DR drill).

terraform {
  required_version = ">= 1.5"
  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = ">= 5.40"
    }
  }
}

provider "aws" {
  region = var.region
}

variable "region" {
  description = "AWS region of the DR site."
  type        = string
  default     = "eu-west-1"
}

variable "artifact_bucket" {
  description = "Bucket that scripts/package uploaded the receiver and Lambda zips to."
  type        = string
}

variable "vpc_id" {
  description = "VPC of the receiver."
  type        = string
}

variable "subnet_id" {
  description = "Private subnet of the receiver (routes to S3, SQS, SSM and EC2)."
  type        = string
}

variable "alert_email" {
  description = "Email for alarms (empty: none)."
  type        = string
  default     = ""
}

module "pilotlight" {
  source             = "../../modules/pilotlight"
  name               = "pilotlight"
  artifact_bucket    = var.artifact_bucket
  receiver_vpc_id    = var.vpc_id
  receiver_subnet_id = var.subnet_id
  alert_email        = var.alert_email
}

output "bucket_name" {
  value = module.pilotlight.bucket_name
}

output "queue_url" {
  value = module.pilotlight.queue_url
}

output "dr_function_name" {
  value = module.pilotlight.dr_function_name
}

output "sender_role_arn" {
  value = module.pilotlight.sender_role_arn
}

output "sender_config" {
  value = module.pilotlight.sender_config
}
