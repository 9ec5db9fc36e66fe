# The only routes out of the VPC: to the organisation's private networks, through its transit
# gateway, one route per network given (never a default route).

resource "aws_ec2_transit_gateway_vpc_attachment" "this" {
  count = var.transit_gateway_id == null ? 0 : 1

  transit_gateway_id = var.transit_gateway_id
  vpc_id             = aws_vpc.this.id
  subnet_ids         = [for az in var.availability_zones : aws_subnet.private[az].id]
  dns_support        = "enable"
  tags               = merge(local.tags, { Name = var.name })
}

resource "aws_route" "private_networks" {
  for_each = var.transit_gateway_id == null ? toset([]) : toset(var.routed_cidrs)

  route_table_id         = aws_route_table.private.id
  destination_cidr_block = each.value
  transit_gateway_id     = var.transit_gateway_id

  depends_on = [aws_ec2_transit_gateway_vpc_attachment.this]
}
