{
  "key_id": "06e4093d75d23eeee3c5a6ef4cba55b8",
  "signature": "vilz7mve6fQbM6ePMnzgFS7cDcacu1vCBgLeWnij9v8l3xFiJvXDLQkLBUH7fWoPpshXcNBgd4twkNFmHhElDQ=="
}
