output "key_arn" {
  description = "ARN of the key, for kms_key_id arguments and IAM policies."
  value       = aws_kms_key.this.arn
}

output "key_id" {
  description = "ID of the key."
  value       = aws_kms_key.this.key_id
}

output "alias_name" {
  description = "The key's alias (alias/<name>)."
  value       = aws_kms_alias.this.name
}
