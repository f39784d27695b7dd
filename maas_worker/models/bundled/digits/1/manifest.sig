{
  "key_id": "59e3c56d8c5e1a929cd9e2942064e5cf",
  "signature": "XNZeCO5iqCOI52YLBBCXqSbX1ewSzFkg3Eu1eddZWanLQaOXpujwyxFuKPrHu3ny9LNZC/hLIn415BwQ02p5Cg=="
}
